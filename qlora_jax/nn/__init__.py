"""The network: parameter roles and their device layout, the 4-bit matmul, the QLoRA layer,
model families and the decoder, generation."""
