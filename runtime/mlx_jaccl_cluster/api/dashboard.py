"""The dashboard and the observability endpoints. No MLX.

- ``GET /dashboard``: one server-rendered page plus ``/dashboard/static/*`` (plain JS and
  CSS shipped in the package; no build step, no CDN). The page holds no cluster data
  and is open like ``/health``; everything it shows comes from the endpoints below,
  which need the API key when one is set (the page asks for it and sends it as a
  Bearer header).
- ``GET /dashboard/state``: one JSON snapshot (topology, per-rank memory and liveness,
  queue, batch, link figures, tokens/s of the last minute, totals).
- ``GET /requests``, ``GET /errors``: the last 200 requests and the last 50 errors.
- ``GET /metrics``: Prometheus text format.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from string import Template

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..generation import Engine
from ..settings import Settings
from ..state import ClusterState
from .metrics import Observer

ASSETS = Path(__file__).parent

router = APIRouter()  # behind the API key
_UNKNOWN = {"host": "?", "address": "", "up": False, "silent_s": None, "memory": {}}  # a rank not (yet) joined


def snapshot(settings: Settings, state: ClusterState, serving, engine: Engine, observer: Observer) -> dict:
    """Everything the dashboard shows and /metrics exports about the cluster right now."""
    ranks = state.ranks()
    return {
        "time": time.time(),
        "status": state.phase,
        "detail": state.detail,
        "model": state.model_id,
        "backend": state.backend,
        "parallel": state.parallel or settings.parallel,
        "world_size": state.world_size,
        "ranks_up": state.ranks_up(),
        "uptime_s": round(time.time() - state.started, 1),
        "queue_depth": serving.queue_depth,
        "inflight": serving.inflight,
        "max_batch": settings.max_batch,
        "batch_size": engine.active,
        "ranks": [
            {"rank": r, "links": state.links[r] if r < len(state.links) else [], **_UNKNOWN, **ranks.get(r, {})}
            for r in range(state.world_size)
        ],
        "link": asdict(state.link),
        "tokens_per_s": observer.tokens_per_second(),
        "requests": len(observer.requests),
        "errors": len(observer.errors),
    }


def install(app: FastAPI, settings: Settings, state: ClusterState, serving, engine: Engine, observer: Observer) -> None:
    page = Template((ASSETS / "templates" / "dashboard.html").read_text())
    app.state.snapshot = lambda: snapshot(settings, state, serving, engine, observer)
    observer.watch_cluster(app.state.snapshot)
    app.mount("/dashboard/static", StaticFiles(directory=ASSETS / "static"), name="dashboard-static")

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page.substitute(version=__version__, key_required="true" if settings.api_key else "false"))


@router.get("/dashboard/state")
async def dashboard_state(request: Request) -> dict:
    return request.app.state.snapshot()


@router.get("/requests")
async def requests(request: Request) -> dict:
    return {"object": "list", "data": request.app.state.observer.request_history()}


@router.get("/errors")
async def errors(request: Request) -> dict:
    return {"object": "list", "data": request.app.state.observer.error_history()}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.observer.registry), media_type=CONTENT_TYPE_LATEST)
