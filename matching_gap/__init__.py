"""matching-gap: self-supervised learning with the matching gap, in JAX/Flax on OTT-JAX."""

__version__ = "0.1.0"
