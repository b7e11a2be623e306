"""Training checkpoints: step folders and resume selection, integrity checks, the saved random
state, and resuming on another world size."""
