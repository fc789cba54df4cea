"""Tiny local models, tokenizers and data for tests, benchmarks and the built-in world: they
build in seconds and need no hub access (``tiny``)."""
