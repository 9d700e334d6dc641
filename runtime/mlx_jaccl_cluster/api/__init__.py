"""HTTP layer: request/response models, routes and errors. Never imports MLX; calls the
engine only through ``generation.Engine``."""
