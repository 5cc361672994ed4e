"""The plain float types, expressed as one-element blocks so the registry treats them alike.

    f32   4 bytes  IEEE binary32, little-endian
    f16   2 bytes  IEEE binary16; from f32 by round-to-nearest-even (GGML_FP32_TO_FP16)
    bf16  2 bytes  top 16 bits of binary32; from f32 by round-to-nearest-even, NaN kept quiet
                   (ggml_compute_fp32_to_bf16)
"""

import numpy as np

from ._common import BlockType, bf16_to_f32, f32_to_bf16_bits, f32_to_fp16_bits, fp16_to_f32

F32_BLOCK = BlockType("f32", 0, 1, np.dtype([("v", "<f4")]),
                      lambda raw: np.ascontiguousarray(raw, dtype=np.uint8).view("<f4").astype(np.float32),
                      lambda x: np.ascontiguousarray(x, dtype="<f4").view(np.uint8).reshape(len(x), 4))
F16_BLOCK = BlockType("f16", 1, 1, np.dtype([("v", "<u2")]),
                      lambda raw: fp16_to_f32(np.ascontiguousarray(raw, dtype=np.uint8).view("<u2")),
                      lambda x: f32_to_fp16_bits(x).view(np.uint8).reshape(len(x), 2),
                      ggml_quantize="ggml_fp32_to_fp16_row")
BF16_BLOCK = BlockType("bf16", 30, 1, np.dtype([("v", "<u2")]),
                       lambda raw: bf16_to_f32(np.ascontiguousarray(raw, dtype=np.uint8).view("<u2")),
                       lambda x: f32_to_bf16_bits(x).view(np.uint8).reshape(len(x), 2),
                       ggml_quantize="ggml_fp32_to_bf16_row_ref")
