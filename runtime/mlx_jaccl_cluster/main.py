"""``mjc-rank``: the one program every rank runs.

A service manager (launchd, systemd, supervisord) starts it with the same environment
``mlx.launch`` would give it. Rank 0 serves the API; the other ranks follow. Crash-only:
a rank that loses its group exits non-zero and the service manager starts it again.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from pydantic import ValidationError

EXIT_CONFIG = 2  # bad settings or model: restarting will not help until someone fixes it
EXIT_LOST = 1  # the group broke: restart the whole group
#: rank 0, once its group is lost: /health says so (503) this long, then the API stops
#: taking connections and gives the ones in flight up to GRACE_S to get their answers
LOST_ANSWER_S = 1.0
GRACE_S = 3.0


def _configure_logging(level: str, rank: int) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _after(delay: float, action, *args) -> None:
    """Run ``action(*args)`` on a daemon timer thread after ``delay`` s."""
    timer = threading.Timer(delay, action, args)
    timer.daemon = True
    timer.start()


def _pin_cuda_device(rank: int) -> None:
    """Backend nccl on a host with several GPUs: show this rank only GPU ``rank % GPUs``.

    MLX's nccl group binds rank r to GPU r % (GPUs), but MLX computes on GPU 0, so every
    other rank handed NCCL a stream of the wrong GPU ('invalid resource handle', seen on
    2 H200s). Must run before MLX starts CUDA; an operator's CUDA_VISIBLE_DEVICES wins.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return
    try:
        gpus = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return
    if gpus > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank % gpus)


#: What every rank's process sets for itself unless its environment already does.
ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",  # never reach for a hub at run time
    "TOKENIZERS_PARALLELISM": "false",
    # MLX on CUDA raises "Cache thrashing is happening" from inside an eval, and the engine
    # thread dies with it, once one of its per-shape caches (cuDNN attention graphs, CUDA
    # graphs) has missed more than twice its size; the caches stay bounded without the check
    # (docs/BENCHMARKS.md, "Soak on GPUs, session 11").
    "MLX_ENABLE_CACHE_THRASHING_CHECK": "0",
}


def set_env_defaults() -> None:
    """``ENV_DEFAULTS``, before anything imports MLX (it reads them as it builds its caches);
    also for measuring scripts that run the engine in their own process as a rank would."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> None:
    set_env_defaults()
    from .settings import backend_links, load_settings

    try:
        settings = load_settings(argv)
    except (ValidationError, ValueError) as exc:
        print(f"mjc-rank: invalid settings:\n{exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    _configure_logging(settings.log_level, settings.rank)
    log = logging.getLogger("mjc")
    from .engine.allocator import tune_malloc

    tune_malloc(settings.malloc_arena_max)  # before any thread starts (allocator.py)
    if settings.backend == "nccl":
        _pin_cuda_device(settings.rank)

    # Heavy imports before the rendezvous, so no rank stalls its heartbeats importing.
    from . import __version__
    from .cluster import Follower, Leader
    from .engine.core import Engine, memory_stats
    from .state import ClusterState

    state = ClusterState(
        world_size=settings.world_size,
        backend=settings.backend,
        model_id=settings.served_model_id,
        links=backend_links(settings.backend),
    )
    state.ranks = lambda: {
        0: {
            "host": socket.gethostname(),
            "address": settings.api_host,
            "up": True,
            "silent_s": 0.0,
            "memory": memory_stats(),
        }
    }
    engine: Engine | None = None
    config = {
        "world_size": settings.world_size,
        "backend": settings.backend,
        "parallel": settings.parallel,
        "pipeline_split": settings.pipeline_split,
        "model_id": settings.served_model_id,
        "max_batch": settings.max_batch,
        "prefill_step_size": settings.prefill_step_size,
        "step_token_budget": settings.step_token_budget,
        "prompt_cache_size": settings.prompt_cache_size,
        "version": __version__,
    }

    ending: list[int] = []  # the exit code scheduled, once one is
    left = threading.Event()
    api: list = []  # rank 0's uvicorn server, once made

    def stop_serving() -> None:
        if api:
            api[0].should_exit = True  # a graceful shutdown, as on SIGTERM

    def leave(code: int) -> None:
        ending.append(code)
        left.set()
        if settings.rank != 0:
            _after(0.0, os._exit, code)
            return
        # Every request in flight has its error by now; a loaded machine may still take a
        # while to write it. main() leaves with the code once the server has shut down,
        # and the second timer makes sure it does however the shutdown goes.
        _after(LOST_ANSWER_S, stop_serving)
        _after(LOST_ANSWER_S + GRACE_S + 2.0, os._exit, code)

    def lost(reason: str) -> None:
        state.set("lost", reason)
        if engine is not None:
            engine.fail_all(f"cluster lost a rank: {reason}")
        log.error("exiting so the service manager restarts the group: %s", reason)
        leave(EXIT_LOST)

    def fatal(message: str, config_error: bool) -> None:
        log.error("%s", message)
        leave(EXIT_CONFIG if config_error else EXIT_LOST)

    channel = None
    beat = dict(
        heartbeat_interval=settings.heartbeat_interval,
        heartbeat_misses=settings.heartbeat_misses,
        stats=memory_stats,
        on_lost=lost,
        log_every=settings.rendezvous_log_every,
    )
    if settings.world_size > 1:
        if settings.rank == 0:
            channel = Leader(
                settings.control_address,
                settings.world_size,
                settings.peer_ips,
                config,
                secret=settings.secret(),
                **beat,
            )
            try:
                channel.start()
            except OSError as exc:
                log.error("cannot listen on control address %s: %s", settings.control, exc)
                sys.exit(EXIT_CONFIG)
            state.ranks_up = channel.ranks_up
            state.ranks = channel.ranks_view
        else:
            channel = Follower(settings.rank, settings.control_address, config, secret=settings.secret(), **beat)

    engine = Engine(settings, state, channel, on_fatal=fatal)

    if settings.rank != 0:
        engine.start()
        engine.join()
        # The engine thread of a follower ends only when the group is lost or the engine
        # failed; either schedules the exit with its code (the channel's hook may still be
        # logging why). Returning here would beat that timer to it with a clean exit, and
        # the service manager would see 0.
        left.wait(2.0)
        os._exit(ending[0] if ending else EXIT_LOST)

    import uvicorn

    from .api.app import create_app

    app = create_app(settings, state, engine)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=GRACE_S,
        )
    )
    api.append(server)
    if ending:  # lost before the server existed: it starts, and shuts down at once
        stop_serving()
    engine.start()
    try:
        server.run()  # a port it cannot bind ends it with uvicorn's SystemExit(3)
    finally:
        if ending:  # the group broke or the engine failed: leave with that code
            os._exit(ending[0])


if __name__ == "__main__":
    main()
