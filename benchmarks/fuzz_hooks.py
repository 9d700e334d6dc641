"""Schemathesis hooks for ``benchmarks/fuzz_api.py`` (loaded through ``SCHEMATHESIS_HOOKS``).

Generated requests may ask for thousands of tokens; a fuzz run checks how the server
answers, not how fast it generates, so any ``max_tokens`` above ``FUZZ_MAX_TOKENS`` is
lowered to it (the request stays valid: the schema sets no upper bound)."""

from __future__ import annotations

import os

import schemathesis

CAP = int(os.environ.get("FUZZ_MAX_TOKENS", "8"))


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if type(value) in (int, float) and value > CAP:
                body[name] = CAP
