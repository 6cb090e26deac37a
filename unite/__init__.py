"""UNITE: one transformer that tokenizes images and generates their latents (see README)."""
