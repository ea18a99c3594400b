"""Training heads from the store: inputs, loader, pyramid, heads, loop, metrics, runs, tasks."""
