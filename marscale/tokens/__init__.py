"""Tokens of a clip: which are masked (masking), how a batch of clips lays them out (packing)
and what each micro-batch holds (batches)."""
