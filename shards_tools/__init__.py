"""Dataset-to-shards tooling for marscale (`marscale-shards`)."""
