"""LongVILA in JAX."""
