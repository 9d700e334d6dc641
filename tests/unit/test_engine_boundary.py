"""The HTTP/engine boundary: the ``Engine`` protocol is all ``api/`` calls, ``engine/core.py``
implements all of it, and the STEP frame's wire form stays what every rank reads."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from mlx_jaccl_cluster import generation
from mlx_jaccl_cluster.generation import GenerationRequest, SamplingParams, Step

API = Path(generation.__file__).parent / "api"


def _protocol_members() -> set[str]:
    """Methods, properties and attributes ``generation.Engine`` declares."""
    declared = set(generation.Engine.__annotations__)
    for name, value in vars(generation.Engine).items():
        if not name.startswith("_") and (callable(value) or isinstance(value, property)):
            declared.add(name)
    return declared


def _engine_uses() -> dict[str, list[str]]:
    """Every ``<...>engine.NAME`` in api/, NAME -> where."""
    uses: dict[str, list[str]] = {}
    for path in sorted(API.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            base = node.value
            named = (isinstance(base, ast.Name) and base.id == "engine") or (
                isinstance(base, ast.Attribute) and base.attr == "engine"
            )
            if named:
                uses.setdefault(node.attr, []).append(f"{path.name}:{node.lineno}")
    return uses


def test_api_calls_only_the_protocol():
    uses = _engine_uses()
    assert uses, "found no engine calls in api/: the scan is broken"
    outside = {name: where for name, where in uses.items() if name not in _protocol_members()}
    assert not outside, f"api/ uses engine members that generation.Engine does not declare: {outside}"


def test_core_engine_implements_the_protocol():
    from mlx_jaccl_cluster.engine.core import Engine

    init = ast.parse(inspect.getsource(Engine.__init__).lstrip())
    assigned = {
        t.attr
        for t in ast.walk(init)
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }
    missing = sorted(name for name in _protocol_members() if not hasattr(Engine, name) and name not in assigned)
    assert not missing, f"engine/core.py's Engine lacks {missing}"
    for name in _protocol_members() - set(generation.Engine.__annotations__):
        declared, implemented = getattr(generation.Engine, name), getattr(Engine, name)
        assert isinstance(declared, property) == isinstance(implemented, property), name
        if not isinstance(declared, property):
            assert list(inspect.signature(declared).parameters) == list(inspect.signature(implemented).parameters)


def _request(prompt: list[int]) -> GenerationRequest:
    return GenerationRequest(prompt, 16, SamplingParams(temperature=0.5, seed=7, logit_bias={3: -1.0}), grammar="g")


def test_step_wire_form_is_the_frame_every_rank_reads():
    step = Step(41, (_request([1, 2]),), (0,), (5, 6))
    assert step.to_wire() == (
        b'{"c":41,"i":[{"prompt":[1,2],"max_tokens":16,"sampling":{"temperature":0.5,"top_p":1.0,"top_k":0,'
        b'"min_p":0.0,"seed":7,"repetition_penalty":null,"presence_penalty":null,"frequency_penalty":null,'
        b'"logit_bias":[[3,-1.0]]},"grammar":"g"}],"k":[0],"r":[5,6]}'
    )
    assert Step(0).to_wire() == b'{"c":0}'
    assert Step(2, (_request([1]),), (0,), alone=True).to_wire().endswith(b'"k":[0],"l":1}')
    assert Step(9, probe={"k": "lat", "it": 2}).to_wire() == b'{"c":9,"p":{"k":"lat","it":2}}'


@pytest.mark.parametrize(
    "step",
    [
        Step(0),
        Step(3, removes=(1,)),
        Step(7, (_request([4]), _request([5, 6, 7])), (0, 2)),
        Step(7, (_request([4]),), (1,), alone=True),
        Step(8, probe={"k": "bw", "it": 2, "n": 4096}),
    ],
)
def test_step_round_trips(step):
    assert Step.from_wire(step.to_wire()) == step
