"""The FastAPI application served by rank 0."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from .. import __version__
from ..generation import Engine
from ..settings import Settings
from ..state import ClusterState
from . import anthropic, dashboard, errors, ollama, openapi, responses
from .errors import APIError
from .guard import Guard
from .metrics import CountRequests, Observer
from .routes import router
from .serving import Serving


def _loop_dispatch(loop: asyncio.AbstractEventLoop):
    """Run the engine's per-step batch of sink calls on the event loop, in one wake-up."""

    def run(batch) -> None:
        for ticket, event in batch:
            ticket.sink(event)

    return lambda batch: loop.call_soon_threadsafe(run, batch)


def create_app(settings: Settings, state: ClusterState, engine: Engine) -> FastAPI:
    serving = Serving(settings, state, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.attach(_loop_dispatch(asyncio.get_running_loop()))
        yield
        serving.close()

    # No /docs: Swagger UI would load its assets from a CDN, and nodes may be offline.
    app = FastAPI(title="mlx-jaccl-cluster", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serving = serving
    app.state.observer = observer = Observer()
    paths: set[str] = set()

    def refused(scope: dict, error: APIError) -> None:  # a request the guard answered itself
        path = scope["path"]
        observer.error(path if path in paths else "other", error.status, error.type, error.message)

    # Ollama's and Anthropic's routes answer errors in their own shapes (OpenAI's elsewhere).
    app.state.error_shapes = shapes = [ollama.ERROR_SHAPE, anthropic.ERROR_SHAPE]
    # The guard runs inside CountRequests (so its refusals are counted) and before routing.
    app.add_middleware(
        Guard,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        max_body_bytes=settings.max_body_bytes,
        key_failures=settings.api_key_failures,
        record=refused,
        shapes=shapes,
    )
    app.add_middleware(CountRequests, observer=observer)
    errors.install(app)
    app.include_router(router)
    for surface in (responses, anthropic, ollama):
        app.include_router(surface.router)
    app.include_router(dashboard.router)
    dashboard.install(app, settings, state, serving, engine, observer)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if state.ready else state.phase,
            "world_size": state.world_size,
            "ranks_up": state.ranks_up(),
            "backend": state.backend,
            "parallel": state.parallel,
            "parallel_reason": state.parallel_reason,
            "model": state.model_id,
            "queue_depth": serving.queue_depth,
            "active": serving.inflight,
            "uptime_s": round(time.time() - state.started, 1),
        }
        if engine.sampling_defaults is not None:
            body["sampling_defaults"] = engine.sampling_defaults.describe()
        if not state.ready:
            body["detail"] = state.detail
        return JSONResponse(body, status_code=200 if state.ready else 503)

    paths.update(p for p in (getattr(r, "path", None) for r in app.routes) if p)
    openapi.install(app, settings.served_model_id, keyed=settings.api_key is not None)
    return app
