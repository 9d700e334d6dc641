"""The engine: the only code that touches MLX, on one thread of its own.

Start-up on every rank: rendezvous on the control channel, ``mx.distributed.init``
(strict, never ``any``), load the shard, report ready. Then:

- **rank 0** takes requests and cancellations from its inbox, sends them to the other
  ranks as one STEP frame, applies them to mlx-lm's ``BatchGenerator`` and runs one
  step, then hands the new tokens to the HTTP layer in one batch; a request that arrives
  to an idle engine runs alone on the single-sequence path (``single.py``) until a second
  one comes, which the STEP frame says (``"l"``);
- **other ranks** apply each STEP frame exactly as rank 0 did and run the same step.

While idle, rank 0 may send a STEP frame naming one link-probe step instead, which
every rank runs at that point (``link_probe.py``).

Every rank therefore inserts the same requests in the same order (uids agree), removes
the same uids at the same step, and runs the same number of steps. Finishing is decided
from token ids, identical everywhere; each STEP frame also carries a checksum of the
previous step's tokens, so a rank that drifted exits instead of serving garbage.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import sys
import threading
import time
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from ..cluster import Follower, Leader, Rejected
from ..generation import (
    GRAMMAR_GAVE_UP,
    Dispatch,
    EngineUnavailable,
    ErrorEvent,
    GenerationRequest,
    SamplingDefaults,
    Step,
    Ticket,
    TokenEvent,
    direct_dispatch,
)
from ..settings import Settings
from ..state import ClusterState
from ..structured import Grammars
from . import fastpath, grammar, prefill
from .allocator import heap_stats
from .link_probe import LinkProbe, run_step
from .loader import LoadedModel, ModelError, load_model
from .prompt_cache import PromptCache, held_bytes, kv_bytes_per_token
from .sampling import make_processors, make_sampler
from .single import Lone, can_join_batch, hand_over, take_uid

log = logging.getLogger("mjc.engine")


class Desync(Exception):
    """This rank's tokens no longer match rank 0's."""


def memory_stats() -> dict:
    """This rank's MLX memory, the part of it its prompt cache holds, process RSS and (glibc)
    what malloc's heaps hold in use and free, in bytes (sent with every heartbeat)."""
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
        "prompt_cache": held_bytes(),
        "rss": rss,
    } | heap_stats()


class Engine:
    """The engine of one rank (``generation.Engine`` is what the HTTP side sees of it)."""

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
        self.dispatch: Dispatch = direct_dispatch
        self.loaded: LoadedModel | None = None
        #: what a request that leaves a sampling field out gets (resolved at load)
        self.sampling_defaults: SamplingDefaults | None = None
        #: the model's llguidance tokenizer and grammar builder (structured output)
        self.grammars: Grammars | None = None
        #: the constrained sequences' matchers, masked as one batch (engine/grammar.py)
        self._masks: grammar.GrammarBatch | None = None
        #: uid -> why its matcher gave up, for the sequences that ended so (rank 0 turns
        #: their last token into an error; see _deliver)
        self._gave_up: dict[int, str] = {}
        self._inbox: queue.SimpleQueue[tuple[str, Ticket]] = queue.SimpleQueue()
        self._tickets: dict[int, Ticket] = {}
        #: tickets the engine thread has taken from the inbox and not yet placed by uid (a
        #: group that breaks in between, inside a collective, must still answer them)
        self._held: list[Ticket] = []
        self._tickets_lock = threading.Lock()  # guards _tickets, _held, _dead and the inbox's end
        self._active: set[int] = set()
        self._next_uid = 0
        self._checksum = 0
        self._dead: str | None = None
        self._gen: BatchGenerator | None = None
        self._lone: Lone | None = None  # the request running alone on the single-sequence path
        self._lone_ok = False  # settings.single_sequence, and the model's caches can join a batch
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
    def model_config(self) -> dict:
        assert self.loaded is not None
        return self.loaded.config

    @property
    def active(self) -> int:
        return len(self._active)

    def attach(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def submit(self, request: GenerationRequest, sink: Callable[[object], None]) -> Ticket:
        ticket = Ticket(request=request, sink=sink)
        with self._tickets_lock:  # so fail_all, once it has run, leaves nothing in the inbox
            if self._dead is not None or not self.state.ready:
                raise EngineUnavailable(self._dead or f"cluster is {self.state.phase}")
            self._inbox.put(("insert", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop generating for ``ticket`` (client gone, timeout, stop string)."""
        if not ticket.cancelled:
            ticket.cancelled = True
            self._inbox.put(("cancel", ticket))

    def fail_all(self, message: str) -> None:
        """End every request in flight with an error; refuse new ones. Any thread."""
        with self._tickets_lock:
            self._dead = message
            tickets = list(self._tickets.values()) + self._held
            self._tickets.clear()
            self._held = []
            while True:
                try:
                    kind, ticket = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "insert":
                    tickets.append(ticket)
        self._refuse(tickets, message)

    def _refuse(self, tickets: list[Ticket], message: str) -> None:
        """Answer ``tickets`` 503: the cluster cannot serve them (any thread)."""
        error = ErrorEvent(message=message, kind="service_unavailable", status=503)
        self.dispatch([(t, error) for t in tickets])

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
        self.loaded = load_model(
            s.model, s.parallel, group, s.mlx_backend, s.pipeline_split, s.generic_pipeline, s.pipeline_transport
        )
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
        prefill.install()
        self._lone_ok = s.single_sequence and can_join_batch(self.loaded.model)
        if self.grammars.lltokenizer is not None:
            eos = sorted(tokenizer.eos_token_ids)
            self._masks = grammar.GrammarBatch(self.grammars.lltokenizer, self.grammars.vocab_size, eos, s.max_batch)
        grammar.install(self._masks)  # last: it wraps the step that fastpath installed
        self._gen = prefill.Budgeted(
            self.loaded.model,
            step_token_budget=s.step_token_budget,
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

    def _goes_alone(self, inserts: list[GenerationRequest], reused: list[tuple[list | None, int]]) -> bool:
        """Whether this step's one insert runs on the single-sequence path: decided from what
        every rank knows alike (the step's inserts, the requests running, the settings)."""
        if not self._lone_ok or self._active or len(inserts) != 1:
            return False
        # a long prompt prefills in the batch, a budget a step, so a request that arrives
        # meanwhile waits one step, not the whole prompt
        return len(inserts[0].prompt_tokens) - reused[0][1] <= self.settings.step_token_budget

    @staticmethod
    def _sampler(request: GenerationRequest):
        sampler = make_sampler(request.sampling)
        return fastpath.WithLogprobs(sampler) if request.top_logprobs is not None else sampler

    def _apply(
        self,
        inserts: list[GenerationRequest],
        removes: list[int],
        reused: list[tuple[list | None, int]],
        alone: bool = False,
    ) -> list[int]:
        """Apply one step's changes; identical on every rank."""
        assert self._gen is not None
        uids = []
        if inserts:
            self._check_grammars(inserts)
        if alone:
            (r,), ((cache, k),) = inserts, reused
            uids = [take_uid(self._gen)]
            self._add_grammars(uids, inserts)  # before the prefill: the matcher builds meanwhile
            self._lone = Lone(
                self._gen,
                uids[0],
                r.prompt_tokens[k:],
                cache if cache is not None else make_prompt_cache(self.loaded.model),
                r.prompt_tokens[:k],
                r.max_tokens,
                self._sampler(r),
                make_processors(r.sampling),
                self._masks if r.grammar is not None else None,
            )
        elif inserts:
            if self._lone is not None:  # a second request: the lone one joins the batch
                hand_over(self._gen, self._lone)
                self._lone = None
            uids = self._gen.insert(
                [r.prompt_tokens[k:] for r, (_, k) in zip(inserts, reused)],
                caches=[cache for cache, _ in reused],
                all_tokens=[r.prompt_tokens[:k] for r, (_, k) in zip(inserts, reused)],
                max_tokens=[r.max_tokens for r in inserts],
                samplers=[self._sampler(r) for r in inserts],
                logits_processors=[make_processors(r.sampling) for r in inserts],
            )
            self._add_grammars(uids, inserts)
        if inserts:
            expected = list(range(self._next_uid, self._next_uid + len(inserts)))
            if uids != expected:
                raise Desync(f"the engine gave uids {uids}, expected {expected}")
            self._next_uid += len(inserts)
            self._active.update(uids)
        if removes:
            lone_uid = self._lone.uid if self._lone is not None else None
            if lone_uid in removes:
                self._lone = None
            if rest := [uid for uid in removes if uid != lone_uid]:
                self._gen.remove(rest)
            self._active.difference_update(removes)
            if self._masks is not None:
                self._masks.discard(removes)
        return uids

    def _add_grammars(self, uids: list[int], inserts: list[GenerationRequest]) -> None:
        """Start building the matchers of the constrained inserts (rows keyed by uid, so a
        lone sequence keeps its row when it joins the batch)."""
        for uid, r in zip(uids, inserts):
            if r.grammar is not None:
                self._masks.add(uid, r.grammar)

    def _check_grammars(self, inserts: list[GenerationRequest]) -> None:
        if self._masks is None and any(r.grammar is not None for r in inserts):
            # rank 0 refuses such requests, so another rank got here only if its
            # environment differs (llguidance missing): out of step, not a bad request
            raise Desync(
                f"rank {self.settings.rank} cannot build a grammar matcher: "
                f"{self.grammars.unsupported if self.grammars else 'no model'}"
            )

    def _step(self) -> list:
        """One generation step (the decode rows plus prompt chunks within the step token
        budget: prefill.Budgeted), or the lone sequence's step."""
        assert self._gen is not None
        if self._lone is not None:
            responses = [self._lone.step()]
            if responses[0].finish_reason is not None:
                self._lone = None
        else:
            _, responses = self._gen.next()
        acc = self._checksum
        for r in responses:
            acc = (acc * 1_000_003 + r.uid * 65_599 + r.token) & 0x7FFFFFFF
            if r.finish_reason is not None:
                self._active.discard(r.uid)
                self._prompts.store(r.all_tokens, r.prompt_cache)
                if self._masks is not None:
                    # a matcher that gave up let only EOS through, so its sequence ends "stop"
                    # (one cut by max_tokens ends "length", which says as much)
                    if self.settings.rank == 0 and r.finish_reason == "stop":
                        if (why := self._masks.failure(r.uid)) is not None:
                            self._gave_up[r.uid] = why
                    self._masks.discard((r.uid,))
        self._checksum = acc
        return responses

    def _leader_loop(self) -> None:
        # BatchGenerator runs its steps on its own stream; the small reads below
        # (logprobs) stay on this thread's default stream so they never wait behind
        # the step it has already queued.
        # A step's tokens go to the HTTP side after the next STEP frame is out: the followers
        # wait for that frame to queue their next step, and handing tokens over wakes the
        # HTTP thread, which then competes for the GIL and the cores while this thread sends.
        probe = LinkProbe(self.settings, self.state.link) if self._group is not None else None
        pending: list | None = None
        while True:
            if pending is not None and not self._active:  # nothing runs next: hand them over now
                self._deliver(pending)
                pending = None
            wait = probe.wait() if probe is not None and not self._active else None
            inserts, removes = self._collect(block=not self._active, timeout=wait)
            if not inserts and not removes and not self._active:
                if wait is not None and (spec := probe.next_step()) is not None:
                    self.channel.broadcast_step(Step(self._checksum, probe=spec))
                    probe.run(self._group, spec)
                continue
            reused = self._reuse([t.request for t in inserts])
            for ticket, (_, k) in zip(inserts, reused):
                ticket.cached_tokens = k
            alone = self._goes_alone([t.request for t in inserts], reused)
            if self.channel is not None:
                self.channel.broadcast_step(
                    Step(
                        self._checksum,
                        tuple(t.request for t in inserts),
                        tuple(k for _, k in reused),
                        tuple(removes),
                        alone=alone,
                    )
                )
            if pending is not None:
                self._deliver(pending)
                pending = None
            uids = self._apply([t.request for t in inserts], removes, reused, alone)
            with self._tickets_lock:
                now = time.perf_counter()
                for uid, ticket in zip(uids, inserts):
                    ticket.uid = uid
                    ticket.inserted = now
                    if self._dead is None:  # else fail_all has answered it already
                        self._tickets[uid] = ticket
                self._held = []
                for uid in removes:
                    self._tickets.pop(uid, None)
            if self._active:
                pending = self._step()

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
        inserts = [t for t in inserts if not t.cancelled]
        with self._tickets_lock:  # held until placed, where fail_all finds them
            dead = self._dead
            if dead is None:
                self._held = list(inserts)
        if dead is not None:  # taken from the inbox just before fail_all drained it
            self._refuse(inserts, dead)
            return [], []
        return inserts, removes

    def _deliver(self, responses: list) -> None:
        batch: list[tuple[Ticket, object]] = []
        with self._tickets_lock:
            for r in responses:
                ticket = self._tickets.get(r.uid)
                why = None
                if r.finish_reason is not None:
                    self._tickets.pop(r.uid, None)
                    why = self._gave_up.pop(r.uid, None)
                if ticket is None or ticket.cancelled:
                    continue
                if why is not None:  # the sequence only ended because its grammar gave up
                    batch.append((ticket, self._gave_up_event(why)))
                else:
                    batch.append((ticket, self._token_event(ticket, r)))
        if batch:
            self.dispatch(batch)

    @staticmethod
    def _gave_up_event(why: str) -> ErrorEvent:
        return ErrorEvent(
            message=(
                f"the output could not be kept to its structure: the grammar matcher gave up ({why}); "
                "simplify the schema or tools (fewer optional properties, alternatives, numeric ranges)"
            ),
            kind="invalid_request_error",
            status=400,
            code=GRAMMAR_GAVE_UP,
        )

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
            step = self.channel.next_step()
            if step.checksum != self._checksum:
                raise Desync(
                    f"rank {self.settings.rank} token checksum {self._checksum} differs from rank 0's {step.checksum}"
                )
            if step.probe is not None:  # a link-probe step, run at the same point as on rank 0
                run_step(self._group, step.probe)
                continue
            inserts = list(step.inserts)
            reused = self._reuse(inserts)
            if tuple(k for _, k in reused) != step.reused:
                raise Desync(
                    f"rank {self.settings.rank} would reuse {[k for _, k in reused]} cached prompt tokens "
                    f"where rank 0 reuses {list(step.reused)}"
                )
            alone = self._goes_alone(inserts, reused)
            if alone != step.alone:
                raise Desync(
                    f"rank {self.settings.rank} would run the step's insert "
                    f"{'alone' if alone else 'in the batch'}, rank 0 does not"
                )
            self._apply(inserts, list(step.removes), reused, alone)
            if self._active:
                self._step()
