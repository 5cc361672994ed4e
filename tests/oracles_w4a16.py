"""The W4A16 oracles: AutoGPTQ 0.7.1, AutoAWQ 0.2.9 and compressed-tensors 0.20.0, their own
packers and dequantizations, for tests only (the engine never imports them).

auto_gptq's and awq's package __init__ modules do not import here (they need a transformers
older than the installed one, and `datasets`), so the few source files the tests need are
loaded by path, under package stubs that skip those __init__ modules. Nothing of their
arithmetic is patched. A missing library is an oracle_skip (a failure under CI=true).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pathlib
import sys
import types

import numpy as np

from ci_skips import oracle_import, oracle_skip

AUTO_GPTQ_VERSION = "0.7.1"
AUTOAWQ_VERSION = "0.2.9"
COMPRESSED_TENSORS_VERSION = "0.20.0"


def _package_dir(name: str) -> pathlib.Path:
    if hasattr(sys.modules.get(name), "__path__"):  # already stubbed
        return pathlib.Path(list(sys.modules[name].__path__)[0])
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        oracle_skip(f"{name} is not installed (pip install --no-deps -r requirements-oracles.txt)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _stub_packages(root: str, subpackages) -> pathlib.Path:
    """Register `root` and its subpackages as empty packages pointing at the installed files,
    so that `import root.x.y` runs y.py alone, without root/__init__.py."""
    base = _package_dir(root)
    for dotted in (root, *subpackages):
        if dotted in sys.modules and hasattr(sys.modules[dotted], "__path__"):
            continue
        mod = types.ModuleType(dotted)
        mod.__path__ = [str(base.joinpath(*dotted.split(".")[1:]))]
        sys.modules[dotted] = mod
    return base


def _dist_version(dist: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        oracle_skip(f"{dist} is not installed (pip install --no-deps -r requirements-oracles.txt)")


def _check_version(dist: str, want: str):
    got = _dist_version(dist)
    if got != want:
        oracle_skip(f"{dist} {got} is installed, the tests pin {want} (requirements-oracles.txt)")


def torch():
    return oracle_import("torch")


def auto_gptq_quantlinear(desc_act: bool, group_size: int):
    """The QuantLinear AutoGPTQ 0.7.1 picks on a CPU (auto_gptq/utils/import_utils.py
    dynamically_import_QuantLinear with its CUDA and exllama kernels unavailable):
    qlinear_cuda_old unless act-order with groups, then qlinear_cuda. Both dequantize in torch
    in forward(); they differ in how a v1 zero is decoded (see refinfer/w4a16/gptq.py)."""
    torch()
    oracle_import("transformers")
    _check_version("auto-gptq", AUTO_GPTQ_VERSION)
    _stub_packages("auto_gptq", ["auto_gptq.nn_modules", "auto_gptq.nn_modules.qlinear"])
    logging.getLogger("auto_gptq").setLevel(logging.ERROR)  # "CUDA extension not installed."
    name = "qlinear_cuda_old" if (not desc_act or group_size == -1) else "qlinear_cuda"
    logging.getLogger(f"auto_gptq.nn_modules.qlinear.{name}").setLevel(logging.ERROR)
    return importlib.import_module(f"auto_gptq.nn_modules.qlinear.{name}").QuantLinear


def awq_modules():
    """(packing_utils, gemm, gemv) modules of AutoAWQ 0.2.9."""
    torch()
    oracle_import("accelerate")
    _check_version("autoawq", AUTOAWQ_VERSION)
    _stub_packages("awq", ["awq.utils", "awq.modules", "awq.modules.linear"])
    return (importlib.import_module("awq.utils.packing_utils"), importlib.import_module("awq.modules.linear.gemm"),
            importlib.import_module("awq.modules.linear.gemv"))


def compressed_tensors():
    """compressed-tensors 0.20.0: (helpers with pack_to_int32/unpack_from_int32, the
    lifecycle forward module with quantize/dequantize, the pack-quantized compressor, the
    quantization package)."""
    torch()
    _check_version("compressed-tensors", COMPRESSED_TENSORS_VERSION)
    oracle_import("compressed_tensors")
    return (importlib.import_module("compressed_tensors.compressors.pack_quantized.helpers"),
            importlib.import_module("compressed_tensors.quantization.lifecycle.forward"),
            importlib.import_module("compressed_tensors.compressors.pack_quantized.base"),
            importlib.import_module("compressed_tensors.quantization"))


def f32(t) -> np.ndarray:
    """A torch tensor's values as float32 NumPy (fp16 and bf16 widen exactly)."""
    return t.detach().float().cpu().numpy()


def i64(t) -> np.ndarray:
    return t.detach().cpu().to(dtype=__import__("torch").int64).numpy()
