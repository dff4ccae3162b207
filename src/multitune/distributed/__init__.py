"""Process-group setup, parallelism and the multi-node launch command."""
