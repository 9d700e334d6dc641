"""Each node gets what it serves, through site.yml: two "machines" on this host (two
install prefixes, so two model folders and two supervisords) serve a four-file model as a
pipeline; each receives only the weight files of its layers (stage_files.py) with a
manifest cut to them that `status` and the models check verify, and the cluster answers
like in-process mlx-lm on the whole model. Moving the split re-syncs: the files a node no
longer serves leave it."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest
import yaml
from ansible_run import ROOT
from local_cluster import playbook

from mlx_jaccl_cluster.launch import free_ports
from mlx_jaccl_cluster.models.tiny import build_tiny_model, reshard

pytestmark = pytest.mark.slow

FILES = [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage-sync")
    model = build_tiny_model(tmp / "tiny-stages", arch="mistral")  # untied: the later stage needs no embedding
    reshard(model, 4)  # file 1: embeddings + layers 0-1, 2: 1-3, 3: 3-4, 4: 4-5 + norm + head
    inv = tmp / "inventory"
    shutil.copytree(ROOT / "inventory" / "local", inv)
    hosts = yaml.safe_load((inv / "hosts.yml").read_text())
    api, control, *ring = free_ports(4)
    for i, host in enumerate(hosts["all"]["children"]["mlx_cluster"]["hosts"].values()):
        host |= {
            "cluster_ring_port": ring[i],
            "cluster_unit_name": f"mjc-stage-rank{i}",
            "cluster_install_prefix": str(tmp / f"machine{i}"),
            "cluster_model_path": str(tmp / f"machine{i}" / "models" / "tiny-stages"),
        }
    (inv / "hosts.yml").write_text(yaml.safe_dump(hosts))
    group = yaml.safe_load((inv / "group_vars" / "mlx_cluster.yml").read_text())
    group |= {
        "cluster_install_prefix": str(tmp / "unused"),
        "cluster_model_path": str(tmp / "unused" / "model"),
        "cluster_model_source": "local",
        "cluster_model_local_path": str(model),
        "cluster_model_name": "tiny-stages",
        "cluster_controller_cache": str(tmp / "controller-cache"),
        "cluster_parallel": "pipeline",
        "cluster_api_port": api,
        "cluster_control_port": control,
    }
    (inv / "group_vars" / "mlx_cluster.yml").write_text(yaml.safe_dump(group))
    yield inv, tmp, model, api
    for i in range(2):
        ctl = tmp / f"machine{i}" / "venv" / "bin" / "supervisorctl"
        conf = tmp / f"machine{i}" / "etc" / "supervisord.conf"
        if ctl.exists() and conf.exists():
            subprocess.run([str(ctl), "-c", str(conf), "shutdown"], timeout=60)


def set_layers(inv, layers: list[int]) -> None:
    hosts = yaml.safe_load((inv / "hosts.yml").read_text())
    for host, n in zip(hosts["all"]["children"]["mlx_cluster"]["hosts"].values(), layers):
        host["cluster_layers"] = n
    (inv / "hosts.yml").write_text(yaml.safe_dump(hosts))


def weights(tmp, i) -> list[str]:
    return sorted(p.name for p in (tmp / f"machine{i}" / "models" / "tiny-stages").glob("*.safetensors"))


def expected_answer(model) -> str:
    from mlx_lm import load, stream_generate

    m, tok = load(str(model))
    tokens = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    return "".join(r.text for r in stream_generate(m, tok, tokens, max_tokens=12))


def answer(api) -> str:
    body = {"model": "tiny-stages", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12}
    r = httpx.post(f"http://127.0.0.1:{api}/v1/chat/completions", json=body | {"temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def verify(tmp, i) -> subprocess.CompletedProcess:
    prefix = tmp / f"machine{i}"
    argv = [str(prefix / "venv" / "bin" / "python"), "-m", "mlx_jaccl_cluster.ops.manifest", "verify"]
    argv += [str(prefix / "models" / "tiny-stages"), "--manifest", str(prefix / "etc" / "model-manifest.json")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_each_machine_receives_and_serves_only_its_share(two_machines):
    inv, tmp, model, api = two_machines
    set_layers(inv, [4, 2])
    out = playbook(inv, "site.yml").stdout
    assert "rank 0 rank0: layers 0..3" in out and "rank 1 rank1: layers 4..5" in out
    assert weights(tmp, 0) == FILES and weights(tmp, 1) == FILES[2:]
    node = json.loads((tmp / "machine1" / "etc" / "model-manifest.json").read_text())
    assert sorted(f for f in node["files"] if f.endswith(".safetensors")) == FILES[2:]
    assert {"config.json", "tokenizer.json"} <= set(node["files"]) and node["of_files"] > len(node["files"])
    check = verify(tmp, 1)
    assert check.returncode == 0 and "share 7 of 9 files (layers 4-5), verified" in check.stdout, (
        check.stdout + check.stderr
    )
    health = httpx.get(f"http://127.0.0.1:{api}/health", timeout=10).json()
    assert health["status"] == "ok" and health["parallel"] == "pipeline" and health["ranks_up"] == 2
    assert answer(api) == expected_answer(model)
    status = playbook(inv, "playbooks/status.yml").stdout
    assert status.count("verified") >= 2 and "ranks up 2/2" in status
    # each node says it holds a share, and which (make status)
    assert "share 9 of 9 files (layers 0-3), verified" in status, status
    assert "share 7 of 9 files (layers 4-5), verified" in status, status

    # the split moves: machine0 keeps layers 0-1 (files 1, 2, 4) and loses file 3;
    # machine1 serves layers 2-5 and receives file 2
    set_layers(inv, [2, 4])
    playbook(inv, "site.yml")
    assert weights(tmp, 0) == [FILES[0], FILES[1], FILES[3]] and weights(tmp, 1) == FILES[1:]
    assert verify(tmp, 0).returncode == 0 and verify(tmp, 1).returncode == 0
    assert "share 8 of 9 files (layers 0-1), verified" in verify(tmp, 0).stdout
    assert answer(api) == expected_answer(model)
    # converging again copies nothing: the shares are in place and verified (the service may
    # still be settling after the restart the new split caused, so only the model is judged)
    again = playbook(inv, "site.yml").stdout
    assert not [t for t in changed_tasks(again) if t.startswith(("Model |", "Sync |"))], changed_tasks(again)


def changed_tasks(out: str) -> list[str]:
    """Names of the tasks that reported a change in a playbook's output."""
    names = []
    for block in out.split("TASK [")[1:]:
        head, _, body = block.partition("\n")
        if any(line.startswith("changed:") for line in body.splitlines()):
            names.append(head.split("] ", 1)[0].split(" : ", 1)[-1])
    return names
