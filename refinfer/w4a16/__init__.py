"""W4A16 checkpoints: the packed layouts of GPTQ, AWQ and compressed-tensors (one module each,
with the bit diagram and the library function it matches) and the checkpoint reader/writer
(checkpoint.py) that turns them into IntGroupTensor (refinfer/quant/intgroup.py)."""
