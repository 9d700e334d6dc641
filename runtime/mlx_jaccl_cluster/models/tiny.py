"""A deterministic tiny random-weight chat model, built offline in about a second.

The model is an ordinary mlx-lm folder (``config.json``, ``model.safetensors``,
``model.safetensors.index.json``, ``tokenizer.json``, ``tokenizer_config.json``) that
``mlx_lm.load`` and ``mlx_lm.sharded_load`` read with no hub access. Its weights are random,
so its text is gibberish, but it is a real network of the chosen architecture: tensor and
pipeline splits, caches and sampling run exactly as on a real model. The same arguments give
bit-identical files, so tests rebuild it rather than commit weights.

Default shape (all archs): 6 layers, hidden 192, 6 attention and 6 key/value heads of
dimension 32, MLP 384, untied embeddings, float32. Head counts and the MLP width divide by
1, 2, 3 and 6 ranks; 6 layers split over 2 or 3 pipeline stages.

Two choices keep its greedy text useful to tests:

- Initialisation. mlx-lm's default random init makes a network whose next token depends
  almost only on the current one, so greedy text soon loops on one or two tokens. Here the
  token embeddings have unit variance (instead of 1/hidden) and every other matrix is twice
  its default scale (uniform in +-2/sqrt(fan_in)); greedy output then stays varied for
  hundreds of tokens.
- Output head. Its rows for the special tokens and for tokens that are not printable text
  on their own (lone UTF-8 bytes >= 0x80, control characters and other unprintable
  characters except newline) are zero.
  Their logit is then 0 while the largest of the others is always positive, so greedy
  decoding never emits them: replies are printable text, never stop early on
  ``<|im_end|>``, and always run to ``max_tokens`` (sampling may still pick them, rarely).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import CHATML_TEMPLATE, ModelBuildError, check_out_dir, staging, write_json

#: arch -> (model_type, HF architecture name). qwen2 has a pipeline split in mlx-lm;
#: llama and qwen3 have tensor parallel (``shard``) only (qwen2 has both). The others have
#: neither in mlx-lm 0.32.2 (except gemma3_text, which shards) and exercise the generic
#: pipeline split (engine/pipeline.py): gemma3_text with sliding-window and global layers
#: (masks per layer index, rotating caches), granite with its embedding / residual /
#: logit multipliers, phi3 with fused projections, olmo2 with its norm placement,
#: starcoder2 with layer norms and biases, mistral (mlx-lm runs it as llama).
ARCHES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "gemma3_text": ("gemma3_text", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "olmo2": ("olmo2", "Olmo2ForCausalLM"),
    "granite": ("granite", "GraniteForCausalLM"),
    "starcoder2": ("starcoder2", "Starcoder2ForCausalLM"),
}

#: Fields an architecture needs beyond DEFAULT_SHAPE (mlx-lm's ModelArgs of that type).
ARCH_FIELDS: dict[str, dict[str, Any]] = {
    "llama": {"attention_bias": False, "mlp_bias": False},
    "mistral": {"attention_bias": False, "mlp_bias": False},
    # A window shorter than the tests' prompts, so rotating caches wrap; every 3rd layer global.
    "gemma3_text": {
        "sliding_window": 24,
        "sliding_window_pattern": 3,
        "query_pre_attn_scalar": 32,
        "rope_local_base_freq": 10000.0,
    },
    "granite": {
        "logits_scaling": 2.0,
        "attention_multiplier": 0.2,
        "embedding_multiplier": 1.5,
        "residual_multiplier": 0.5,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "olmo2": {"attention_bias": False, "mlp_bias": False},
    "starcoder2": {"norm_epsilon": 1e-5},
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB_TARGET = 1024

DEFAULT_SHAPE: dict[str, Any] = {
    "hidden_size": 192,
    "num_hidden_layers": 6,
    "intermediate_size": 384,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}

# A fixed, self-written English corpus for the tokenizer. Changing it changes every
# tiny model (token ids, vocabulary size and so every weight).
CORPUS = """\
The cluster serves one chat endpoint from several small computers. Each computer runs a rank,
and the ranks share the work of every request: they split the layers of the model, or the
heads of every layer, and pass the partial results to each other over the network.

A request arrives as a list of messages. The first rank turns the messages into tokens with
the chat template, runs the model, and streams the answer back one token at a time. When the
answer is complete, or when the client stops reading, the ranks return to waiting.

What is the capital of France? The capital of France is Paris. What is the capital of Italy?
It is Rome. Berlin is the capital of Germany, Madrid is the capital of Spain, and Lisbon is
the capital of Portugal. Tokyo, Ottawa, Canberra and Nairobi are capitals too.

Hello! How are you today? I am fine, thank you. Can you help me with a question about the
weather? Of course. It will be sunny in the morning, with light rain in the afternoon and a
cool wind in the evening. Please remember to take an umbrella.

Numbers matter as well: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 256, 1024, 2048 and 3.14159.
Write a short poem about the sea. The sea is wide and grey and deep; it rolls the pebbles in
its sleep. Explain why the sky is blue: sunlight scatters in the air, and blue light scatters
the most, so the whole sky glows blue during the day.

def add(a, b):
    return a + b

Good software is tested. A test that cannot fail proves nothing, so every test should check
a fact that a broken program would get wrong. Keep the tests fast, keep them offline, and run
them often.
"""


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB_TARGET):
    """Train a byte-level BPE on :data:`CORPUS`; deterministic (returns a ``tokenizers.Tokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Whole paragraphs, in order. The result is the same in every process (checked by the
    # tests across interpreters with different hash seeds).
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    return tok


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level map, reversed: the character a byte-level BPE uses -> that byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars = {b: b for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


def unprintable_token_ids(tok) -> list[int]:
    """Ids of the special tokens and of tokens that do not decode to printable text alone."""
    special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    dec = _byte_decoder()
    bad = []
    for i in range(tok.get_vocab_size()):
        if i in special:
            bad.append(i)
            continue
        try:
            text = bytes(dec[c] for c in tok.id_to_token(i)).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            bad.append(i)
            continue
        if not text.replace("\n", "").isprintable():
            bad.append(i)
    return bad


def _init_weights(model, cfg: dict, muted: list[int]) -> None:
    """Rescale mlx-lm's random init in place (see the module docstring)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    out = []
    for path, v in tree_flatten(model.parameters()):
        if path == "model.embed_tokens.weight":
            v = v * (cfg["hidden_size"] ** 0.5)
        elif path != "lm_head.weight" and path.endswith(".weight") and v.ndim == 2:
            v = v * 2.0
        out.append((path, v))
    model.update(tree_unflatten(out))
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    keep = mx.ones((cfg["vocab_size"], 1), dtype=head.weight.dtype)
    keep[mx.array(muted)] = 0.0
    head.weight = head.weight * keep


def tokenizer_config(max_len: int) -> dict:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": max_len,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def model_config(arch: str, vocab_size: int, eos_id: int, pad_id: int, overrides: dict) -> dict:
    if arch not in ARCHES:
        raise ModelBuildError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(ARCHES))}")
    model_type, architecture = ARCHES[arch]
    cfg = dict(DEFAULT_SHAPE)
    unknown = set(overrides) - set(DEFAULT_SHAPE) - {"head_dim", "tie_word_embeddings"}
    if unknown:
        raise ModelBuildError(f"unknown override(s): {', '.join(sorted(unknown))}")
    cfg.update(overrides)
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ModelBuildError("hidden_size must be a multiple of num_attention_heads")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ModelBuildError("num_attention_heads must be a multiple of num_key_value_heads")
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    if arch == "qwen2" and cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]:
        raise ModelBuildError("qwen2 has head_dim = hidden_size / num_attention_heads")
    cfg.update(
        model_type=model_type,
        architectures=[architecture],
        vocab_size=vocab_size,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype="float32",
    )
    cfg.update(ARCH_FIELDS.get(arch, {}))
    return cfg


DTYPES = ("float32", "bfloat16", "float16")


def build_tiny_model(out_dir, arch: str = "llama", seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Build a tiny random-weight ``arch`` model (a key of :data:`ARCHES`) in ``out_dir``.

    ``overrides`` change the shape (``hidden_size``, ``num_hidden_layers``,
    ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``max_position_embeddings``, ``rms_norm_eps``, ``rope_theta``, ``tie_word_embeddings``).
    ``dtype`` is the saved weights' type (float32, bfloat16 or float16; the init is drawn
    in float32 and cast). ``out_dir`` must be absent, empty, or an earlier mjc-model build
    (which is replaced).
    Returns the folder's path. Raises :class:`ModelBuildError` on bad input.
    It seeds MLX's global random generator with ``seed``.
    """
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, save_config, save_model

    out_dir = Path(out_dir).expanduser().absolute()
    check_out_dir(out_dir)
    if arch not in ARCHES:
        raise ModelBuildError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(ARCHES))}")
    seed = int(seed)
    if dtype not in DTYPES:
        raise ModelBuildError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")

    tok = train_tokenizer()
    cfg = model_config(
        arch,
        vocab_size=tok.get_vocab_size(),
        eos_id=tok.token_to_id("<|im_end|>"),
        pad_id=tok.token_to_id("<|endoftext|>"),
        overrides=overrides,
    )
    model_cls, args_cls = _get_classes(cfg)

    marker = {
        "builder": "tiny",
        "arch": arch,
        "seed": seed,
        "overrides": {k: overrides[k] for k in sorted(overrides)},
    }
    if dtype != "float32":  # earlier float32 builds keep their marker
        marker["dtype"] = dtype
        cfg["torch_dtype"] = dtype
    with staging(out_dir, marker) as tmp:
        mx.random.seed(seed)
        model = model_cls(args_cls.from_dict(cfg))
        _init_weights(model, cfg, unprintable_token_ids(tok))
        if dtype != "float32":
            model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())
        save_model(tmp, model)
        save_config(dict(cfg), tmp / "config.json")
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config(cfg["max_position_embeddings"]))
    return out_dir


def reshard(folder, n_files: int) -> list[str]:
    """Rewrite ``folder``'s weights as ``n_files`` files of about equal size with a weight
    index, in the order a converted checkpoint has them (embeddings, the layers in order,
    then the final norm and head), so layers span files as in a large model's folder
    (tests of per-stage files, stage_files.py). Returns the new file names."""
    import mlx.core as mx

    from ..stage_files import INDEX, LAYER

    folder = Path(folder)
    old = sorted(folder.glob("model*.safetensors"))
    weights: dict = {}
    for path in old:
        weights.update(mx.load(str(path)))

    def order(name: str):
        found = LAYER.search(name)
        return (1, int(found.group(1)), name) if found else (0 if "embed" in name else 2, 0, name)

    names = sorted(weights, key=order)
    total = sum(weights[n].nbytes for n in names)
    names_of: list[list[str]] = [[] for _ in range(n_files)]
    done = 0
    for name in names:
        names_of[min(n_files - 1, done * n_files // total)].append(name)
        done += weights[name].nbytes
    files = [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]
    if any(not group for group in names_of):
        raise ModelBuildError(f"{folder} has too few tensors for {n_files} files")
    for path in old:
        path.unlink()
    weight_map = {}
    for file, group in zip(files, names_of):
        mx.save_safetensors(str(folder / file), {n: weights[n] for n in group}, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(group, file))
    write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return files
