"""Training engine: config, DeepSpeed wrapping, the loop, checkpoints, evaluation."""
