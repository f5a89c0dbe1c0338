"""Pallas kernels for the fused 4-bit dequantize-matmul (GPU: Mosaic GPU; TPU: Mosaic TPU)."""
