"""The sampler's filters: the same choices as mlx-lm's, and a request's top_p, min_p or
top_k value never costs a new compiled kernel (engine/sampling.py says why)."""

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from mlx_jaccl_cluster.engine.sampling import make_sampler, min_p_filter, top_k_filter, top_p_filter
from mlx_jaccl_cluster.generation import SamplingParams

VOCAB = 64


def _logprobs(seed: int = 0) -> mx.array:
    logits = mx.random.normal((3, VOCAB), key=mx.random.key(seed)) * 3
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _kept(x: mx.array) -> list[list[bool]]:
    return mx.isfinite(x).tolist()


def test_each_filter_keeps_the_tokens_mlx_lm_keeps():
    x = _logprobs()
    assert _kept(top_p_filter(0.9)(x)) == _kept(apply_top_p(x, 0.9))
    assert _kept(min_p_filter(0.1)(x)) == _kept(apply_min_p(x, 0.1))
    assert _kept(top_k_filter(5)(x)) == _kept(apply_top_k(x, 5))
    assert all(sum(row) == 5 for row in _kept(top_k_filter(5)(x)))
    assert top_k_filter(VOCAB)(x) is x  # a top_k at or above the vocabulary keeps everything
    assert _kept(min_p_filter(1.0)(x)) == _kept(apply_min_p(x, 1.0))  # only the likeliest stays
    bf16 = x.astype(mx.bfloat16)
    for ours, theirs in (
        (top_p_filter(0.9), lambda v: apply_top_p(v, 0.9)),
        (min_p_filter(0.1), lambda v: apply_min_p(v, 0.1)),
    ):
        assert ours(bf16).dtype == mx.bfloat16
        assert _kept(ours(bf16)) == _kept(theirs(bf16))


def _compiled_libraries(tmp_path) -> set[str]:
    return {p.name for p in tmp_path.rglob("*.so")}


def _sample(values) -> None:
    x = _logprobs(1)
    for i, v in enumerate(values):
        params = SamplingParams(temperature=0.7, top_p=v, min_p=v / 10, top_k=5 + i, seed=i)
        mx.eval(make_sampler(params)(x))


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="counts the CPU backend's compiled libraries")
def test_new_filter_values_compile_nothing_new(tmp_path, monkeypatch):
    # MLX's CPU backend writes each kernel mx.compile builds to $TMPDIR/mlx/<version>/cpu
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    _sample([0.51, 0.62, 0.73])
    first = _compiled_libraries(tmp_path)
    _sample([0.54, 0.65, 0.76, 0.87])
    assert _compiled_libraries(tmp_path) == first
    # the control: a value passed as a Python number does build a kernel, written there
    mx.eval(apply_top_p(_logprobs(1), 0.4321))
    assert _compiled_libraries(tmp_path) > first
