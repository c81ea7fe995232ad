"""The mini world: procedural faces, a tiny diffusers pipeline and an identity encoder."""
