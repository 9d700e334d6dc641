"""The engine: the only code that touches MLX, on one thread of its own.

Start-up on every rank: rendezvous on the control channel, ``mx.distributed.init``
(strict, never ``any``), load the shard, report ready. Then:

- **rank 0** takes requests and cancellations from its inbox, sends them to the other
  ranks as one STEP frame, applies them to mlx-lm's ``BatchGenerator`` and runs one
  step, then hands the new tokens to the HTTP layer in one batch;
- **other ranks** apply each STEP frame exactly as rank 0 did and run the same step.

While idle, rank 0 may send a STEP frame naming one link-probe step instead, which
every rank runs at that point (``probe.py``).

Every rank therefore inserts the same requests in the same order (uids agree), removes
the same uids at the same step, and runs the same number of steps. Finishing is decided
from token ids, identical everywhere; each STEP frame also carries a checksum of the
previous step's tokens, so a rank that drifted exits instead of serving garbage.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from ..cluster import Follower, Leader, Rejected
from ..generation import EngineUnavailable, ErrorEvent, GenerationRequest, SamplingDefaults, TokenEvent
from ..settings import Settings
from ..state import ClusterState
from ..structured import Grammars
from . import fastpath, grammar
from .loader import LoadedModel, ModelError, load_model
from .probe import LinkProbe, run_step
from .prompt_cache import PromptCache, kv_bytes_per_token
from .sampling import make_processors, make_sampler

log = logging.getLogger("mjc.engine")


class Desync(Exception):
    """This rank's tokens no longer match rank 0's."""


@dataclass(eq=False)
class Ticket:
    """One request inside the engine. ``sink`` runs on the HTTP side via the dispatcher."""

    request: GenerationRequest
    sink: Callable[[object], None]
    uid: int | None = None
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused (set before the first token)
    inserted: float | None = None  # perf_counter when it entered the batch (its service time starts)
    submitted: float = field(default_factory=time.perf_counter)


Dispatch = Callable[[list[tuple[Ticket, object]]], None]


def _direct_dispatch(batch: list[tuple[Ticket, object]]) -> None:
    for ticket, event in batch:
        ticket.sink(event)


def memory_stats() -> dict:
    """This rank's MLX memory and process RSS, in bytes (sent with every heartbeat)."""
    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = peak if sys.platform == "darwin" else peak * 1024
    return {
        "active": mx.get_active_memory(),
        "peak": mx.get_peak_memory(),
        "cache": mx.get_cache_memory(),
        "rss": rss,
    }


class Engine:
    def __init__(
        self,
        settings: Settings,
        state: ClusterState,
        channel: Leader | Follower | None,
        on_fatal: Callable[[str, bool], None],
    ):
        self.settings = settings
        self.state = state
        self.channel = channel
        self.on_fatal = on_fatal
        self.dispatch: Dispatch = _direct_dispatch
        self.loaded: LoadedModel | None = None
        #: what a request that leaves a sampling field out gets (resolved at load)
        self.sampling_defaults: SamplingDefaults | None = None
        #: the model's llguidance tokenizer and grammar builder (structured output)
        self.grammars: Grammars | None = None
        #: the constrained sequences' matchers, masked as one batch (engine/grammar.py)
        self._masks: grammar.GrammarBatch | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Ticket]] = queue.SimpleQueue()
        self._tickets: dict[int, Ticket] = {}
        self._tickets_lock = threading.Lock()
        self._active: set[int] = set()
        self._next_uid = 0
        self._checksum = 0
        self._dead: str | None = None
        self._gen: BatchGenerator | None = None
        self._group: mx.distributed.Group | None = None
        self._prompts = PromptCache(settings.prompt_cache_size, settings.prompt_cache_bytes)
        self._thread = threading.Thread(target=self._run, name="mjc-engine", daemon=True)

    # --- the HTTP side's view (thread-safe) ----------------------------------------
    @property
    def tokenizer(self):
        assert self.loaded is not None
        return self.loaded.tokenizer

    @property
    def text_machine(self):
        assert self.loaded is not None
        return self.loaded.text_machine

    @property
    def context_length(self) -> int | None:
        """The model's context, capped by the max_context setting."""
        limits = [n for n in (self.loaded.context_length if self.loaded else None, self.settings.max_context) if n]
        return min(limits) if limits else None

    @property
    def vocab_size(self) -> int | None:
        return self.loaded.config.get("vocab_size") if self.loaded else None

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def submit(self, request: GenerationRequest, sink: Callable[[object], None]) -> Ticket:
        if self._dead is not None or not self.state.ready:
            raise EngineUnavailable(self._dead or f"cluster is {self.state.phase}")
        ticket = Ticket(request=request, sink=sink)
        self._inbox.put(("insert", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop generating for ``ticket`` (client gone, timeout, stop string)."""
        if not ticket.cancelled:
            ticket.cancelled = True
            self._inbox.put(("cancel", ticket))

    def fail_all(self, message: str, status: int = 503) -> None:
        """End every request in flight with an error; refuse new ones. Any thread."""
        self._dead = message
        with self._tickets_lock:
            tickets = list(self._tickets.values())
            self._tickets.clear()
        pending = []
        while True:
            try:
                kind, ticket = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "insert":
                pending.append(ticket)
        error = ErrorEvent(message=message, kind="service_unavailable", status=status)
        self.dispatch([(t, error) for t in tickets + pending])

    # --- start-up ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._start_up()
            if self.settings.rank == 0:
                self._leader_loop()
            else:
                self._follower_loop()
        except (ModelError, Rejected) as exc:
            self._fatal(str(exc), config_error=True)
        except Exception as exc:  # crash-only: any engine failure ends the process
            if self.channel is not None and self.channel.live.wait_lost(self.settings.heartbeat_interval):
                # A collective fails when a peer dies; the control channel, which names the
                # lost rank, has handled it (streams ended, exit scheduled).
                log.warning("engine stopped: %s (%s)", self.channel.live.lost_reason, exc)
                return
            log.exception("engine failed")
            self._fatal(f"{type(exc).__name__}: {exc}", config_error=False)

    def _fatal(self, message: str, config_error: bool) -> None:
        if isinstance(self.channel, Follower) and self.state.phase == "loading":
            self.channel.fail(message)
        self.state.set("failed", message)
        self.fail_all(message)
        self.on_fatal(message, config_error)

    def _start_up(self) -> None:
        s = self.settings
        group = None
        if s.world_size > 1:
            self.state.set("waiting_for_ranks", "rendezvous on the control channel")
            if isinstance(self.channel, Leader):
                self.channel.wait_for_peers()
                self.channel.go()
            else:
                assert isinstance(self.channel, Follower)
                self.channel.join()
            group = self._group = self._init_group()
        # Without a limit MLX keeps every freed buffer for reuse, up to its memory limit: a
        # burst of long prompts would leave the process that much larger for good.
        mx.set_cache_limit(s.mlx_cache_limit)
        self.state.set("loading", f"loading {s.model}")
        started = time.perf_counter()
        self.loaded = load_model(s.model, s.parallel, group, s.mlx_backend, s.pipeline_split, s.generic_pipeline)
        layout = self.loaded.layout
        log.info(
            "rank %d loaded %s in %.1f s: %s (%s)%s",
            s.rank,
            s.model,
            time.perf_counter() - started,
            layout.parallel,
            layout.reason,
            f"; {self.loaded.layout_detail}" if self.loaded.layout_detail else "",
        )
        self.state.parallel, self.state.parallel_reason = layout.parallel, layout.reason
        self.sampling_defaults = SamplingDefaults.resolve(s.sampling_overrides, self.loaded.generation_config or {})
        tokenizer = self.loaded.tokenizer
        self.grammars = Grammars(
            tokenizer, self.vocab_size, s.max_schema_bytes, s.max_schema_depth, s.schema_compile_timeout
        )
        if self.grammars.unsupported:
            log.warning("structured output is off: %s", self.grammars.unsupported)
        self._prompts.token_bytes = kv_bytes_per_token(self.loaded.config)
        fastpath.install()
        if self.grammars.lltokenizer is not None:
            eos = sorted(tokenizer.eos_token_ids)
            self._masks = grammar.GrammarBatch(self.grammars.lltokenizer, self.grammars.vocab_size, eos, s.max_batch)
        grammar.install(self._masks)
        self._gen = BatchGenerator(
            self.loaded.model,
            stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=s.max_batch,
            prefill_batch_size=min(s.max_batch, 8),
            prefill_step_size=s.prefill_step_size,
        )
        if isinstance(self.channel, Leader):
            self.channel.wait_ready()
        elif isinstance(self.channel, Follower):
            self.channel.ready()
        self.state.set("ready")
        log.info("rank %d ready (world size %d, %s, %s)", s.rank, s.world_size, s.backend, layout.parallel)

    def _init_group(self) -> mx.distributed.Group:
        s = self.settings
        if s.backend == "jaccl-ring":
            os.environ["MLX_JACCL_RING"] = "1"
        if s.backend == "nccl":
            # MLX's nccl backend takes rank and size from the environment only, and rank 0
            # hands out NCCL's id on NCCL_HOST_IP:NCCL_PORT (it binds the port on every address).
            os.environ["MLX_RANK"] = str(s.rank)
            os.environ["MLX_WORLD_SIZE"] = str(s.world_size)
            missing = [v for v in ("NCCL_HOST_IP", "NCCL_PORT") if not os.environ.get(v)]
            if missing:
                raise ModelError(
                    f"backend nccl needs {' and '.join(missing)} (rank 0's address and a free port "
                    "for NCCL's rendezvous) in every rank's environment"
                )
        group = mx.distributed.init(backend=s.mlx_backend, strict=True)
        if group.size() != s.world_size or group.rank() != s.rank:
            raise ModelError(
                f"MLX formed a group of size {group.size()} with this process as rank {group.rank()}, "
                f"but the settings say rank {s.rank} of {s.world_size}; re-render the backend files"
            )
        return group

    # --- the steps ---------------------------------------------------------------
    def _reuse(self, inserts: list[GenerationRequest]) -> list[tuple[list | None, int]]:
        """The reusable prompt cache of each insert (see prompt_cache.py)."""
        return [self._prompts.fetch(r.prompt_tokens) for r in inserts]

    def _apply(
        self, inserts: list[GenerationRequest], removes: list[int], reused: list[tuple[list | None, int]]
    ) -> list[int]:
        """Apply one step's changes; identical on every rank."""
        assert self._gen is not None
        uids = []
        if inserts:
            self._check_grammars(inserts)
            uids = self._gen.insert(
                [r.prompt_tokens[k:] for r, (_, k) in zip(inserts, reused)],
                caches=[cache for cache, _ in reused],
                all_tokens=[r.prompt_tokens[:k] for r, (_, k) in zip(inserts, reused)],
                max_tokens=[r.max_tokens for r in inserts],
                samplers=[make_sampler(r.sampling) for r in inserts],
                logits_processors=[make_processors(r.sampling) for r in inserts],
            )
            expected = list(range(self._next_uid, self._next_uid + len(inserts)))
            if uids != expected:
                raise Desync(f"BatchGenerator gave uids {uids}, expected {expected}")
            for uid, r in zip(uids, inserts):
                if r.grammar is not None:
                    self._masks.add(uid, r.grammar)
            self._next_uid += len(inserts)
            self._active.update(uids)
        if removes:
            self._gen.remove(removes)
            self._active.difference_update(removes)
            if self._masks is not None:
                self._masks.discard(removes)
        return uids

    def _check_grammars(self, inserts: list[GenerationRequest]) -> None:
        if self._masks is None and any(r.grammar is not None for r in inserts):
            # rank 0 refuses such requests, so another rank got here only if its
            # environment differs (llguidance missing): out of step, not a bad request
            raise Desync(
                f"rank {self.settings.rank} cannot build a grammar matcher: "
                f"{self.grammars.unsupported if self.grammars else 'no model'}"
            )

    def _step(self) -> list:
        """One generation step (decode plus at most one prefill chunk)."""
        assert self._gen is not None
        _, responses = self._gen.next()
        acc = self._checksum
        for r in responses:
            acc = (acc * 1_000_003 + r.uid * 65_599 + r.token) & 0x7FFFFFFF
            if r.finish_reason is not None:
                self._active.discard(r.uid)
                self._prompts.store(r.all_tokens, r.prompt_cache)
                if self._masks is not None:
                    self._masks.discard((r.uid,))
        self._checksum = acc
        return responses

    def _leader_loop(self) -> None:
        # BatchGenerator runs its steps on its own stream; the small reads below
        # (logprobs) stay on this thread's default stream so they never wait behind
        # the step it has already queued.
        probe = LinkProbe(self.settings, self.state.link) if self._group is not None else None
        while True:
            wait = probe.wait() if probe is not None and not self._active else None
            inserts, removes = self._collect(block=not self._active, timeout=wait)
            if not inserts and not removes and not self._active:
                if wait is not None and (spec := probe.next_step()) is not None:
                    self.channel.broadcast_step(
                        json.dumps({"c": self._checksum, "p": spec}, separators=(",", ":")).encode()
                    )
                    probe.run(self._group, spec)
                continue
            reused = self._reuse([t.request for t in inserts])
            for ticket, (_, k) in zip(inserts, reused):
                ticket.cached_tokens = k
            if self.channel is not None:
                payload: dict = {"c": self._checksum}
                if inserts:
                    payload["i"] = [t.request.to_wire() for t in inserts]
                    payload["k"] = [k for _, k in reused]
                if removes:
                    payload["r"] = removes
                self.channel.broadcast_step(json.dumps(payload, separators=(",", ":")).encode())
            uids = self._apply([t.request for t in inserts], removes, reused)
            with self._tickets_lock:
                now = time.perf_counter()
                for uid, ticket in zip(uids, inserts):
                    ticket.uid = uid
                    ticket.inserted = now
                    self._tickets[uid] = ticket
                for uid in removes:
                    self._tickets.pop(uid, None)
            if self._active:
                self._deliver(self._step())

    def _collect(self, block: bool, timeout: float | None = None) -> tuple[list[Ticket], list[int]]:
        """Drain the inbox: new tickets to insert and uids to remove (waiting at most
        ``timeout`` s for the first one when ``block``; None: until one comes)."""
        items = []
        try:
            items.append(self._inbox.get(block=block, timeout=timeout if block else 0))
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        inserts: list[Ticket] = []
        removes: list[int] = []
        for kind, ticket in items:
            if kind == "insert":
                inserts.append(ticket)
            elif ticket.uid is not None and ticket.uid in self._active:
                removes.append(ticket.uid)
        return [t for t in inserts if not t.cancelled], removes

    def _deliver(self, responses: list) -> None:
        batch: list[tuple[Ticket, object]] = []
        with self._tickets_lock:
            for r in responses:
                ticket = self._tickets.get(r.uid)
                if r.finish_reason is not None:
                    self._tickets.pop(r.uid, None)
                if ticket is None or ticket.cancelled:
                    continue
                batch.append((ticket, self._token_event(ticket, r)))
        if batch:
            self.dispatch(batch)

    @staticmethod
    def _token_event(ticket: Ticket, r) -> TokenEvent:
        k = ticket.request.top_logprobs
        if k is None:
            return TokenEvent(token=r.token, finish_reason=r.finish_reason)
        logprobs = r.logprobs
        chosen = logprobs[r.token].item()
        top = None
        if k > 0:
            idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
            vals = logprobs[idx]
            order = mx.argsort(-vals)
            top = list(zip(idx[order].tolist(), vals[order].tolist()))
        return TokenEvent(token=r.token, logprob=chosen, top_logprobs=top, finish_reason=r.finish_reason)

    def _follower_loop(self) -> None:
        assert isinstance(self.channel, Follower) and self._gen is not None
        while True:
            message = json.loads(self.channel.next_step())
            if message.get("c") != self._checksum:
                raise Desync(
                    f"rank {self.settings.rank} token checksum {self._checksum} differs from rank 0's {message.get('c')}"
                )
            if "p" in message:  # a link-probe step, run at the same point as on rank 0
                run_step(self._group, message["p"])
                continue
            inserts = [GenerationRequest.from_wire(d) for d in message.get("i", ())]
            reused = self._reuse(inserts)
            if [k for _, k in reused] != message.get("k", []):
                raise Desync(
                    f"rank {self.settings.rank} would reuse {[k for _, k in reused]} cached prompt tokens "
                    f"where rank 0 reuses {message.get('k')}"
                )
            self._apply(inserts, list(message.get("r", ())), reused)
            if self._active:
                self._step()
