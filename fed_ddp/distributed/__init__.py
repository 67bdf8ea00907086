"""Process-group plumbing: environment, topology and collectives with explicit groups."""
