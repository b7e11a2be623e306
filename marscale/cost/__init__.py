"""What a model costs: FLOPs and parameters counted on the real modules, their cache, the
`marscale cost` table, and counted beside measured (`marscale compare`) with its chart."""
