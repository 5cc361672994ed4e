"""Weight quantizers that write W4A16-style checkpoints: RTN, GPTQ and AWQ, NumPy references of
AutoGPTQ 0.7.1 and AutoAWQ 0.2.9 (one module per method), and the whole-model pipeline."""
