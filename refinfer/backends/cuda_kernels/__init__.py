"""numba.cuda kernels of the cuda backend (cuda_backend.py): matmul.py for the weight ops,
ops.py for the per-token ops, device.py for the block decoders shared with the CPU kernels."""
