"""Training: the config, optimizer, step, builder, loop, checkpoints, metrics and the memory
estimate."""
