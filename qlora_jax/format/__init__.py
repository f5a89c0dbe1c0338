"""The 4-bit format: codebooks, bit-exact float arithmetic, blockwise quantization with double
quantization (bitsandbytes-compatible), and the converted-model folder on disk."""
