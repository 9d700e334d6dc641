"""The FastAPI application served by rank 0."""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from .. import __version__
from ..settings import Settings
from ..state import ClusterState
from . import dashboard, errors
from .errors import APIError
from .metrics import CountRequests, Observer
from .routes import router
from .serving import Serving


def _loop_dispatch(loop: asyncio.AbstractEventLoop):
    """Run the engine's per-step batch of sink calls on the event loop, in one wake-up."""

    def run(batch) -> None:
        for ticket, event in batch:
            ticket.sink(event)

    return lambda batch: loop.call_soon_threadsafe(run, batch)


def create_app(settings: Settings, state: ClusterState, engine) -> FastAPI:
    serving = Serving(settings, state, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.dispatch = _loop_dispatch(asyncio.get_running_loop())
        yield

    async def require_key(request: Request) -> None:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # No /docs: Swagger UI would load its assets from a CDN, and nodes may be offline.
    app = FastAPI(title="mlx-jaccl-cluster", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serving = serving
    app.state.observer = observer = Observer()
    app.add_middleware(CountRequests, observer=observer)
    errors.install(app)
    app.include_router(router, dependencies=[Depends(require_key)])
    app.include_router(dashboard.router, dependencies=[Depends(require_key)])
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
        if not state.ready:
            body["detail"] = state.detail
        return JSONResponse(body, status_code=200 if state.ready else 503)

    return app
