"""The benches' distinct prompts: one token length, all different, the same in every process."""

from __future__ import annotations

import pytest

from mlx_jaccl_cluster.models.tiny import train_tokenizer
from mlx_jaccl_cluster.ops import apibench


@pytest.fixture(scope="module")
def length_of():
    """Token count of a user message through the tiny models' ChatML template, with the real
    byte-level BPE those models ship (it merges some digit groups and not others)."""
    tok = train_tokenizer()

    def count(text: str) -> int:
        return len(tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n").ids)

    return count


def test_candidates_differ_in_length_so_the_filter_matters(length_of):
    assert len({length_of(apibench.numbered_prompt(k)) for k in range(300)}) > 1


def test_prompts_share_one_length_and_are_distinct(length_of):
    prompts = apibench.Prompts(length_of)
    texts = prompts.take(0, 600)
    assert len(set(texts)) == 600
    assert {length_of(t) for t in texts} == {prompts.length}
    assert all(t.endswith(apibench.PROMPT) for t in texts)


def test_consecutive_prompts_differ_in_their_first_character(length_of):
    texts = apibench.Prompts(length_of).take(0, 50)
    assert all(a[0] != b[0] for a, b in zip(texts, texts[1:]))


def test_same_numbers_same_texts_in_every_instance(length_of):
    a, b = apibench.Prompts(length_of), apibench.Prompts(length_of)
    assert a.take(100, 20) == b.take(100, 20)
    assert a[7] == b.take(0, 8)[7]


def test_without_a_tokenizer_every_candidate_counts():
    prompts = apibench.Prompts()
    assert prompts.length is None
    assert prompts.take(0, 3) == [apibench.numbered_prompt(k) for k in range(3)]


def test_running_out_of_candidates_says_how_many_were_found(length_of):
    prompts = apibench.Prompts(length_of, limit=20)
    with pytest.raises(IndexError, match=r"distinct prompts of \d+ tokens among 20 candidates"):
        prompts[20]
    with pytest.raises(IndexError, match="negative"):
        prompts[-1]


def test_bodies_per_client_must_cover_every_client():
    body = apibench.api_body("m", 8, "hello")
    assert body["messages"][0]["content"] == "hello" and body["max_tokens"] == 8
    assert apibench._per_client(body, 3) == [body] * 3
    with pytest.raises(ValueError, match="3 clients need 3 request bodies, got 2"):
        apibench._per_client([body, body], 3)
