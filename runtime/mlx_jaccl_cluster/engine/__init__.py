"""The engine: everything that touches MLX."""
