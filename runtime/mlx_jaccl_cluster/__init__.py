"""mlx-jaccl-cluster: the thin rank-aware runtime.

Every rank runs the same program (``mjc-rank``). Rank 0 serves the OpenAI-compatible
API; the other ranks follow the same generation steps. Modules:

- ``settings``    one typed settings object (environment + CLI); every runtime default
- ``generation``  the boundary between the two sides: the ``Engine`` protocol, requests,
                  events, the STEP frame (``Step``)
- ``cluster``     the control channel beside the MLX group (rendezvous, heartbeats, steps)
- ``engine``      the only code that touches MLX, on its own thread
- ``api``         HTTP layer: request/response models, routes, errors (never imports MLX;
                  calls the engine only through ``generation.Engine``)
- ``models``      offline builders for test models and the embedded default model
"""

__version__ = "0.1.0"
