"""One typed settings object for a rank, read from the environment and the command line.

The environment contract is the one ``mlx.launch`` uses (``MLX_RANK``, ``MLX_HOSTFILE``,
``MLX_IBV_DEVICES``, ``MLX_JACCL_COORDINATOR``, ``MLX_JACCL_RING``, NCCL variables), so a
service manager can start every rank directly. Our own settings use the ``MJC_`` prefix
(``MJC_MODEL``, ``MJC_API_PORT``...) or the matching ``--kebab-case`` flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .generation import SAMPLING_DEFAULTS
from .layout import TRANSPORTS, LayoutError, transport

Backend = Literal["jaccl", "jaccl-ring", "ring", "nccl"]
Parallel = Literal["auto", "tensor", "pipeline"]
PipelineTransport = Literal[TRANSPORTS]


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def split_hostport(value: str, what: str) -> tuple[str, int]:
    """``"10.0.0.1:32400"`` -> ``("10.0.0.1", 32400)`` with an error that names ``what``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must look like HOST:PORT (got {value!r})")
    return host, int(port)


#: Why kv_bits / kv_group_size (mlx-lm's quantized KV cache) cannot be set.
KV_QUANTIZATION_REFUSED = (
    "a quantized KV cache is not offered: mlx-lm 0.32.2's BatchGenerator cannot batch one (QuantizedKVCache "
    "has no merge(), BatchGenerator takes no kv_bits) and every request here runs in a batch"
)
KV_QUANTIZATION_FIX = (
    "Not offered: remove it; to fit a long context lower max_context or max_batch (the fit check sizes "
    "the KV cache from both)"
)


def _refuse_kv_quantization(value: int | None) -> None:
    if value is not None:
        raise ValueError(KV_QUANTIZATION_REFUSED)


NotOffered = Annotated[int | None, AfterValidator(_refuse_kv_quantization)]


def step_budget_problem(budget: int, max_batch: int) -> str | None:
    """The one rule across two settings (checked by Settings and by preflight): why a step
    token budget cannot work with ``max_batch``, or None."""
    if budget > max_batch:
        return None
    return (
        f"step_token_budget ({budget}) must be larger than max_batch ({max_batch}): a step decodes up to "
        "max_batch sequences and prefills with the rest of the budget"
    )


class Settings(BaseSettings):
    """Everything one rank needs. ``mjc-rank --help`` lists every field."""

    model_config = SettingsConfigDict(
        env_prefix="MJC_",
        cli_prog_name="mjc-rank",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
    )

    # --- the group ---------------------------------------------------------------
    rank: int = Field(
        default_factory=lambda: _env_int("MLX_RANK") or 0,
        ge=0,
        description="This process's rank (default: $MLX_RANK, else 0).",
    )
    world_size: int | None = Field(
        default_factory=lambda: _env_int("MLX_WORLD_SIZE"),
        ge=1,
        description="Number of ranks (default: $MLX_WORLD_SIZE, else read from the backend files).",
    )
    backend: Backend = Field(
        "ring",
        description="MLX backend: jaccl (RDMA mesh), jaccl-ring (jaccl with MLX_JACCL_RING=1), ring (TCP), nccl (CUDA).",
    )
    parallel: Parallel = Field(
        "auto",
        description="How the model is split over the ranks: tensor (mlx-lm's shard()), pipeline (contiguous runs "
        "of layers), or auto: tensor when the model shards and its heads and MLP width divide by the world size, pipeline "
        "otherwise (engine/layout.py; /health says which and why).",
    )
    pipeline_split: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="Pipeline layers per rank, comma-separated in rank order (rank 0 first), e.g. 10,20; "
        "empty: an even split. The plan renders it from each node's memory or its cluster_layers.",
    )
    pipeline_transport: PipelineTransport = Field(
        "auto",
        description="How a pipeline stage hands its hidden state to the next rank: send (send/recv), all_gather "
        "(every rank joins one all_gather per stage boundary; the generic split), or auto: all_gather on nccl, "
        "which has no send/recv, send elsewhere.",
    )
    control: str | None = Field(
        None,
        description="HOST:PORT of rank 0's control channel (rendezvous, heartbeats, steps). "
        "Rank 0 binds it; the others connect. Needed when world size > 1.",
    )
    peer_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated addresses the control channel accepts (default: the control host).",
    )
    heartbeat_interval: float = Field(1.0, gt=0, description="Seconds between heartbeats.")
    heartbeat_misses: int = Field(3, ge=1, description="A rank is lost after this many missed beats.")
    rendezvous_log_every: float = Field(10.0, gt=0, description="Seconds between 'still waiting' logs.")
    cluster_secret: SecretStr | None = Field(
        None,
        description="Shared secret every rank proves on the control channel (HMAC challenge-response) before "
        "anything else is said; at least 16 characters. Prefer cluster_secret_file. Needed when world size > 1.",
    )
    cluster_secret_file: Path | None = Field(
        None,
        description="File holding the cluster secret (readable by its owner only; the playbooks render it).",
    )

    # --- the model ---------------------------------------------------------------
    model: Path = Field(..., description="Folder of an mlx-lm model (config.json, *.safetensors, tokenizer).")
    model_id: str | None = Field(None, description="Name served by /v1/models (default: the folder name).")
    max_batch: int = Field(8, ge=1, description="Sequences decoded together.")
    step_token_budget: int = Field(
        512,
        ge=2,
        description="Most tokens one engine step runs: the sequences it decodes plus prompt chunks of the "
        "waiting prompts, which share what is left (engine/prefill.py). Smaller: decoders wait less while a "
        "long prompt prefills, the long prompt waits more for its first token. A lone request whose prompt "
        "fits it starts on the single-sequence path. Must exceed max_batch.",
    )
    prefill_step_size: int = Field(
        512,
        ge=16,
        description="Largest piece of a prompt chunk one forward pass runs (bounds a prefill's activation "
        "memory); how many prompt tokens a step takes is step_token_budget.",
    )
    single_sequence: bool = Field(
        True,
        description="Run a request that arrives to an idle engine on mlx-lm's single-sequence path "
        "(plain KV cache) until a second one arrives (engine/single.py); off: always the batch engine.",
    )
    prompt_cache_size: int = Field(
        8,
        ge=0,
        description="Finished sequences whose KV cache is kept so that a later prompt starting the same way "
        "(a chat's next turn) skips that part of the prefill; 0 turns it off. Each entry costs this rank "
        "its shard of that sequence's KV cache.",
    )
    prompt_cache_bytes: int = Field(
        2 << 30,
        ge=0,
        description="KV memory the prompt cache may hold, in bytes of the whole model's KV cache (all ranks "
        "together; each rank holds its share). Counted as tokens x the per-token KV size from the model's "
        "config, so every rank evicts the same entries. 0: no byte bound (prompt_cache_size still applies).",
    )
    mlx_cache_limit: int = Field(
        256 << 20,
        ge=0,
        description="Bytes of freed buffers MLX keeps for reuse on each rank (mx.set_cache_limit); beyond it "
        "they go back to the system, so memory returns after a burst of long prompts.",
    )
    malloc_arena_max: int = Field(
        2,
        ge=0,
        description="Linux (glibc): most malloc arenas in each rank (each keeps its high-water mark; glibc's own "
        "limit is 8 per core, under which a rank's arenas kept multiplying through a soak on a many-core GPU "
        "host); 0: glibc's limit. Ignored on macOS.",
    )

    max_context: int | None = Field(
        None,
        ge=16,
        description="Most tokens (prompt + completion) one sequence may hold; longer requests get a 400. "
        "Default: the model's max_position_embeddings. The fit check sizes each rank's KV cache for "
        "max_batch sequences of this length.",
    )
    # Named so that setting them is refused with the reason (an unknown key would only say
    # "not a setting", and the rank's environment would drop it silently).
    kv_bits: NotOffered = Field(None, description=KV_QUANTIZATION_FIX)
    kv_group_size: NotOffered = Field(None, description=KV_QUANTIZATION_FIX)

    # --- the API (rank 0) --------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address the API binds on rank 0.")
    api_port: int = Field(8080, gt=0, lt=65536, description="API port on rank 0.")
    api_key: SecretStr | None = Field(
        None, description="When set, every route but /health needs 'Authorization: Bearer <key>'."
    )
    max_queue: int = Field(32, ge=0, description="Requests that may wait for a batch slot; beyond it, 429.")
    max_body_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="Largest request body; larger ones get 413 before they are read (checked after the API key).",
    )
    api_key_failures: int = Field(
        5,
        ge=1,
        description="Wrong API keys one client address may send before each further one blocks it "
        "(1 s, doubling, at most 60 s; 429 while blocked).",
    )
    request_timeout: float = Field(300.0, gt=0, description="Seconds a request may run before it ends with an error.")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request gives none.")
    # Sampling defaults for requests that leave the field out. Unset: the model's
    # generation_config.json, else OpenAI's default (generation.SAMPLING_DEFAULTS).
    default_temperature: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="temperature when a request gives none (default: the model's generation_config.json, else 1.0).",
    )
    default_top_p: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="top_p when a request gives none (default: the model's generation_config.json, else 1.0).",
    )
    default_top_k: int | None = Field(
        None,
        ge=0,
        description="top_k when a request gives none, 0 = off (default: the model's generation_config.json, else 0).",
    )
    default_min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="min_p when a request gives none (default: the model's generation_config.json, else 0).",
    )
    default_repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        le=10.0,
        description="repetition_penalty when a request gives none (default: the model's generation_config.json, else none).",
    )
    max_schema_bytes: int = Field(
        65536,
        ge=64,
        description="Largest JSON schema (response_format, a strict tool's parameters), in bytes of JSON; larger is a 400.",
    )
    max_schema_depth: int = Field(
        32, ge=2, description="Deepest nesting of a JSON schema's own JSON (objects and arrays); deeper is a 400."
    )
    schema_compile_timeout: float = Field(
        0.8,
        gt=0.0,
        description="Seconds rank 0 may spend compiling one request's schema or tool grammar (on a compile "
        "thread, never the event loop); longer is a 400 naming the field, and that schema is refused at once after.",
    )
    keepalive_interval: float = Field(
        5.0, gt=0, description="Seconds between SSE keepalive comments while nothing is sent."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- the link probe (rank 0 decides, every rank runs it; only while idle) -----
    probe_latency_interval: float = Field(
        10.0, ge=0, description="Seconds between idle-time 1-element all_sum latency probes (0: off)."
    )
    probe_bandwidth_interval: float = Field(
        60.0, ge=0, description="Seconds between idle-time all_sum bandwidth probes (0: off)."
    )
    probe_bandwidth_bytes: int = Field(4 << 20, ge=4, description="Message size of the bandwidth probe, in bytes.")
    probe_steps: int = Field(4, ge=1, description="Steps one probe is split into (a request waits at most one step).")
    probe_step_iters: int = Field(2, ge=1, description="Collectives timed in each probe step.")

    generic_pipeline: bool = Field(
        False,
        description="Use the generic pipeline split even where mlx-lm's class has its own pipeline() "
        "(to compare the two; benchmarks/layout_bench.py).",
    )

    @field_validator("peer_ips", mode="before")
    @classmethod
    def _split_peers(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("pipeline_split", mode="before")
    @classmethod
    def _split_layers(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if not all(p.isdigit() for p in parts):
                raise ValueError(
                    f"pipeline_split (MJC_PIPELINE_SPLIT) must be comma-separated layer counts, e.g. 10,20 (got {value!r})"
                )
            return [int(p) for p in parts]
        return value

    @field_validator("api_key", "cluster_secret", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        if self.world_size is None:
            self.world_size = backend_world_size(self.backend)
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank {self.rank} is outside world size {self.world_size} (ranks are 0..{self.world_size - 1})"
            )
        if self.world_size > 1:
            if not self.control:
                raise ValueError("control (MJC_CONTROL=HOST:PORT of rank 0) is required when world size > 1")
            host, _ = split_hostport(self.control, "control (MJC_CONTROL)")
            if not self.peer_ips:
                self.peer_ips = [host]
            self.secret()  # fail at start-up, naming the fix, not at the first connection
        if self.parallel == "pipeline" and self.world_size < 2:
            raise ValueError("parallel=pipeline needs at least 2 ranks")
        if self.pipeline_split and len(self.pipeline_split) != self.world_size:
            raise ValueError(
                f"pipeline_split {self.pipeline_split} has {len(self.pipeline_split)} entries for "
                f"{self.world_size} ranks; give one layer count per rank"
            )
        problem = step_budget_problem(self.step_token_budget, self.max_batch)
        if problem:
            raise ValueError(f"{problem}; raise MJC_STEP_TOKEN_BUDGET or lower MJC_MAX_BATCH")
        if self.pipeline_split and self.parallel == "tensor":
            raise ValueError("pipeline_split is set but parallel=tensor; drop the split or use parallel=pipeline/auto")
        try:
            transport(self.backend, self.pipeline_transport)
        except LayoutError as exc:
            raise ValueError(str(exc)) from None
        return self

    @classmethod
    def default(cls, name: str) -> Any:
        """Field ``name``'s default, for code that takes the value as an argument (cluster.py's
        constructors, launch.py, the plan on the controller): each default is written once,
        on its field here."""
        return cls.model_fields[name].get_default(call_default_factory=True)

    @property
    def served_model_id(self) -> str:
        return self.model_id or self.model.name

    @property
    def sampling_overrides(self) -> dict:
        """The ``default_<field>`` settings by sampling field name (None where unset)."""
        return {name: getattr(self, f"default_{name}") for name in SAMPLING_DEFAULTS}

    @property
    def control_address(self) -> tuple[str, int]:
        assert self.control is not None
        return split_hostport(self.control, "control (MJC_CONTROL)")

    def secret(self) -> bytes:
        """The cluster secret (from cluster_secret, else cluster_secret_file); ValueError says how to set one."""
        how = (
            "set MJC_CLUSTER_SECRET_FILE to a file only this account can read holding the same secret on every "
            "rank (the playbooks render one; by hand: `openssl rand -hex 24 > FILE && chmod 600 FILE`)"
        )
        if self.cluster_secret is not None:
            value = self.cluster_secret.get_secret_value()
        elif self.cluster_secret_file is not None:
            path = self.cluster_secret_file
            try:
                mode = path.stat().st_mode
                value = path.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cluster_secret_file {path} cannot be read ({exc.strerror}); {how}") from None
            if mode & 0o077:
                raise ValueError(
                    f"cluster_secret_file {path} is readable by others (mode {mode & 0o777:o}); run `chmod 600 {path}`"
                )
        else:
            raise ValueError(f"a group of {self.world_size} ranks needs a cluster secret: {how}")
        if len(value) < 16:
            raise ValueError(f"the cluster secret is {len(value)} characters; use at least 16 ({how})")
        return value.encode()

    @property
    def mlx_backend(self) -> str:
        """The name given to ``mx.distributed.init``."""
        return mlx_backend_name(self.backend)


def mlx_backend_name(backend: str) -> str:
    """The name ``mx.distributed.init`` takes for a backend (jaccl-ring is jaccl with an env flag)."""
    return "jaccl" if backend == "jaccl-ring" else backend


def backend_world_size(backend: str) -> int:
    """World size from the backend's own files, as MLX itself will see it."""
    if backend == "ring":
        return len(_read_json_env("MLX_HOSTFILE", "ring")) if os.environ.get("MLX_HOSTFILE") else 1
    if backend in ("jaccl", "jaccl-ring"):
        return len(_read_json_env("MLX_IBV_DEVICES", backend)) if os.environ.get("MLX_IBV_DEVICES") else 1
    return 1  # nccl: MLX_WORLD_SIZE is part of its contract


def backend_links(backend: str) -> list[list[str]]:
    """Per rank, what the backend files give it: ring addresses, or RDMA devices (jaccl)
    as ``"rank J: DEVICE"``. Empty when the backend has no such file (nccl, one rank)."""
    if backend == "ring" and os.environ.get("MLX_HOSTFILE"):
        rows = _read_json_env("MLX_HOSTFILE", backend)
        return [[str(a) for a in (row if isinstance(row, list) else [row])] for row in rows]
    if backend in ("jaccl", "jaccl-ring") and os.environ.get("MLX_IBV_DEVICES"):
        rows = _read_json_env("MLX_IBV_DEVICES", backend)
        return [[f"rank {j}: {d}" for j, d in enumerate(row) if d] if isinstance(row, list) else [] for row in rows]
    return []


def _read_json_env(name: str, backend: str) -> list:
    path = Path(os.environ[name])
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{name} points to {path}, which does not exist (backend {backend})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{name} file {path} must hold a non-empty JSON list, one entry per rank")
    return data


def settings_env(**values: object) -> dict[str, str]:
    """The environment (``MJC_<FIELD>``) that gives a rank these settings: how whoever starts
    ranks (launch.py; the plan) writes their environment. Lists are comma-separated,
    booleans ``true`` / ``false``; a None value leaves its field to its default."""
    prefix = Settings.model_config["env_prefix"]
    env = {}
    for name, value in values.items():
        if name not in Settings.model_fields:
            raise ValueError(f"{name} is not an mjc-rank setting (see mjc-rank --help)")
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        env[f"{prefix}{name.upper()}"] = str(value)
    return env


def load_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the environment, overridden by ``argv`` flags (``--help`` prints them)."""
    return Settings(_cli_parse_args=argv if argv is not None else True)
