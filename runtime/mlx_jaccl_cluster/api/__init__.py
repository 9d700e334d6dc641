"""HTTP layer: request/response models, routes and errors. Never imports MLX."""
