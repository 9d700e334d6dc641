"""The generic pipeline split (engine/pipeline.py) on real ranks: six architectures that
mlx-lm 0.32.2 cannot pipeline itself answer token for token like in-process mlx-lm on one
rank, over 2 and 3 ranks and uneven splits, with 8 requests at once and with the prompt
cache (a chat's second turn); with both hand-overs, send/recv and all_gather (what nccl
runs; ring has both), the latter also with prompts prefilled in small chunks.

One cluster per case (each ~10 s here); every case runs all the checks, and every arch,
rank count and kind of split appears in at least one case."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import reference_text

from mlx_jaccl_cluster.layout import capabilities
from mlx_jaccl_cluster.models.tiny import build_tiny_model

pytestmark = pytest.mark.slow

CASES = [
    # arch, world, split (None: even), hand-over
    ("mistral", 2, None, "send"),
    ("gemma3_text", 2, None, "send"),
    ("gemma3_text", 3, [4, 1, 1], "send"),
    ("phi3", 3, None, "send"),
    ("olmo2", 2, [1, 5], "send"),
    ("granite", 3, [1, 3, 2], "send"),
    ("starcoder2", 2, [4, 2], "send"),
    ("gemma3_text", 3, [1, 2, 3], "all_gather"),
    ("olmo2", 2, None, "all_gather"),
]
# all_gather cases: every prompt is prefilled over several steps (the hand-overs of a
# chunk that computes no logits run through the caches they are tied to)
SMALL_CHUNKS = ("--prefill-step-size", "16", "--step-token-budget", "24")

PROMPTS = [
    "Tell me about the quick brown fox.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "Hello! How are you today?",
    "Can you help me with a question about the weather?",
    "def add(a, b):",
    "Numbers matter as well: 0 1 2 3",
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers about the weather and capitals."}


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-models")
    return {arch: build_tiny_model(root / arch, arch=arch) for arch in sorted({c[0] for c in CASES})}


def _msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    "arch, world, split, handover",
    CASES,
    ids=[f"{a}-{w}rank-{'even' if s is None else '-'.join(map(str, s))}-{h}" for a, w, s, h in CASES],
)
def test_generic_split_equals_one_rank(arch, world, split, handover, arch_models, cluster_factory):
    model = arch_models[arch]
    shards, _ = capabilities(arch)  # mistral shards (as llama): ask for pipeline; the others get it from auto
    gathers = handover == "all_gather"
    args = ("--pipeline-transport", handover, *(SMALL_CHUNKS if gathers else ()))
    cluster = cluster_factory(model, world, parallel="pipeline" if shards else "auto", split=split, args=args)
    health = cluster.wait_ready()
    assert health["ranks_up"] == world
    assert health["parallel"] == "pipeline", health
    reason = "requested" if shards else f"auto: {arch} has no shard() in mlx-lm"
    assert health["parallel_reason"] == reason + ("; stages hand over by all_gather" if gathers else "")
    layers = split or [6 // world + (1 if r < 6 % world else 0) for r in range(world)]
    how = "generic split, all_gather hand-over" if gathers else "generic split"
    start = 0
    for rank, n in enumerate(layers):  # each rank loaded only its own run of layers
        assert f"{how}, layers {start}..{start + n - 1} of 6" in cluster.log(rank)
        start += n

    # One request, then eight at once (decoded together), each against in-process mlx-lm.
    expected = {p: reference_text(model, messages=_msgs(p), max_tokens=20) for p in PROMPTS}
    assert len(set(expected.values())) == len(PROMPTS), "the test model should answer each prompt differently"
    alone = cluster.chat(PROMPTS[0], max_tokens=20)
    assert alone["choices"][0]["message"]["content"] == expected[PROMPTS[0]]
    assert not gathers or alone["usage"]["prompt_tokens"] > 16  # prefilled over more than one chunk
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: cluster.chat(p, max_tokens=20), PROMPTS))
    assert {p: r["choices"][0]["message"]["content"] for p, r in zip(PROMPTS, replies)} == expected

    # A second turn reuses the first turn's KV cache on every rank and still matches.
    first = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    one = cluster.chat("", messages=first, max_tokens=16)
    second = first + [
        {"role": "assistant", "content": one["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And the weather in Paris?"},
    ]
    two = cluster.chat("", messages=second, max_tokens=16)
    cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
    if arch == "gemma3_text":  # its sliding-window caches have wrapped: mlx-lm reuses none (1 rank alike)
        assert cached == 0
    else:
        assert cached >= one["usage"]["prompt_tokens"]
    assert two["choices"][0]["message"]["content"] == reference_text(model, second, max_tokens=16)
    assert cluster.health()[1]["ranks_up"] == world


def test_eight_chats_reuse_their_caches_at_once(arch_models, cluster_factory):
    """Eight chats over 3 ranks with an uneven split: the first turns decode together, then
    the eight second turns decode together, each reusing its own first turn's KV cache on
    every rank, and every answer equals in-process mlx-lm on one rank."""
    model = arch_models["phi3"]
    cluster = cluster_factory(model, 3, split=[3, 2, 1])
    assert cluster.wait_ready()["parallel"] == "pipeline"
    firsts = [[SYSTEM, {"role": "user", "content": p}] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        ones = list(pool.map(lambda m: cluster.chat("", messages=m, max_tokens=12), firsts))
    seconds = [
        first
        + [
            {"role": "assistant", "content": one["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And the weather in Paris?"},
        ]
        for first, one in zip(firsts, ones)
    ]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        twos = list(pool.map(lambda m: cluster.chat("", messages=m, max_tokens=12), seconds))
    for first, one, second, two in zip(firsts, ones, seconds, twos):
        assert one["choices"][0]["message"]["content"] == reference_text(model, first, max_tokens=12)
        assert two["usage"]["prompt_tokens_details"]["cached_tokens"] >= one["usage"]["prompt_tokens"]
        assert two["choices"][0]["message"]["content"] == reference_text(model, second, max_tokens=12)
