"""Weights in and out: pre-trained files (VideoMAE, MAR, marscale layouts) loaded into a model,
and trained models exported."""
