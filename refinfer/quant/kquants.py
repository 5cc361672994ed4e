"""The K-quant super-block formats (256 weights per block), one module per type.

q2_K..q6_K are weight types found in model files; q8_K is the activation type their dot
products run against in llama.cpp's CPU backend. Every dequantize is float-identical to ggml's
`dequantize_row_*`, and every quantize byte-identical to ggml's `quantize_row_*_ref`, which is
what `ggml_quantize_chunk` (llama-quantize) runs when no importance matrix is given.
"""

from . import q2_K, q3_K, q4_K, q5_K, q6_K, q8_K

BLOCKS = [q2_K.BLOCK, q3_K.BLOCK, q4_K.BLOCK, q5_K.BLOCK, q6_K.BLOCK, q8_K.BLOCK]
