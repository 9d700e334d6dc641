"""A tiny model that always answers with one fixed script: for testing tool calls and
reasoning end to end, through real ranks, without a real model.

It is an ordinary random-shaped mlx-lm model whose layers add nothing (every attention
and MLP output projection is zero), so the last hidden state is the current token's
embedding and the output head alone picks the next token. The head is built so that the
chat template's last prompt token is followed by the script's first piece, each piece by
the next, and the last piece by ``<|im_end|>``. Each piece is one added token, so greedy
decoding emits exactly the script on every rank, whatever the prompt, for any tensor
split. The tokenizer is the tiny model's plus ``<think>``/``</think>``, ``<tool_call>``/
``</tool_call>`` and the pieces; the chat template renders tools and tool calls the way
Qwen2.5's does, so mlx-lm infers its ``json_tools`` parser and thinking markers.
"""

from __future__ import annotations

from pathlib import Path

from . import ModelBuildError, check_out_dir, staging, write_json
from .tiny import ARCHES, model_config, tokenizer_config, train_tokenizer

MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

#: The default script: some reasoning, a sentence, then one tool call.
DEFAULT_SCRIPT = [
    "<think>",
    "The user asks about the weather, so I call the weather tool.",
    "</think>",
    "Let me check.",
    "<tool_call>",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "</tool_call>",
]

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Call a tool as <tool_call>{"name": <name>, "arguments": <arguments>}</tool_call><|im_end|>\n'
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' and loop.first %}"
    "{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls %}{% set tool_call = call.function %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>tool\n<tool_response>{{ message.content }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_scripted_model(out_dir, script: list[str] | None = None, arch: str = "qwen2", seed: int = 0) -> Path:
    """Build a model in ``out_dir`` that answers every chat with ``script`` (its pieces
    concatenated), then ends. Pieces must be distinct and non-empty."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes, save_config, save_model
    from tokenizers import AddedToken

    script = list(DEFAULT_SCRIPT if script is None else script)
    if not script or any(not p for p in script) or len(set(script)) != len(script):
        raise ModelBuildError("the script must be a non-empty list of distinct, non-empty pieces")
    if arch not in ARCHES:
        raise ModelBuildError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(ARCHES))}")
    out_dir = Path(out_dir).expanduser().absolute()
    check_out_dir(out_dir)

    tok = train_tokenizer()
    pieces = [p for p in MARKERS if p not in script] + script
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])
    eos = tok.token_to_id("<|im_end|>")
    cfg = model_config(
        arch, vocab_size=tok.get_vocab_size(), eos_id=eos, pad_id=tok.token_to_id("<|endoftext|>"), overrides={}
    )
    # the token a chat prompt ends with (after "<|im_start|>assistant\n")
    start = tok.encode("<|im_start|>assistant\n").ids[-1]
    chain = [start] + [tok.token_to_id(p) for p in script] + [eos]

    model_cls, args_cls = _get_classes(cfg)
    marker = {"builder": "scripted", "arch": arch, "seed": int(seed), "script": script}
    with staging(out_dir, marker) as tmp:
        mx.random.seed(int(seed))
        model = model_cls(args_cls.from_dict(cfg))
        params = []
        for path, v in tree_flatten(model.parameters()):
            if path.endswith(("o_proj.weight", "down_proj.weight")):
                v = mx.zeros_like(v)  # the layers add nothing to the residual stream
            params.append((path, v))
        model.update(tree_unflatten(params))
        embed = model.model.embed_tokens.weight
        unit = embed / mx.linalg.norm(embed, axis=1, keepdims=True)
        head = mx.zeros((cfg["vocab_size"], cfg["hidden_size"]), dtype=embed.dtype)
        for a, b in zip(chain, chain[1:]):
            head[b] = head[b] + unit[a]
        model.lm_head.weight = head
        mx.eval(model.parameters())
        save_model(tmp, model)
        save_config(dict(cfg), tmp / "config.json")
        tok.save(str(tmp / "tokenizer.json"))
        write_json(
            tmp / "tokenizer_config.json",
            tokenizer_config(cfg["max_position_embeddings"]) | {"chat_template": TOOLS_TEMPLATE},
        )
    return out_dir
