"""Device memory a compiled program plans for, before anything is allocated."""

from __future__ import annotations


def planned_bytes(compiled) -> int:
    """Per-device bytes of a `jax.jit(...).lower(...).compile()` result by XLA's memory
    analysis: arguments, outputs and temporaries, less the outputs written over donated
    arguments. What the longest-length searches compare with device memory."""
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
