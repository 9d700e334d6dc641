"""The fit check through site.yml: a layout whose share does not fit a rank is refused in
Readiness, before any host changes, naming the host, the shortfall in GiB and the fixes; the
prompt cache counts (here it is what overflows)."""

from __future__ import annotations

from ansible_run import ansible_playbook
from test_preflight import two_rank_inventory

from mlx_jaccl_cluster.models.tiny import build_tiny_model


def test_a_prompt_cache_that_does_not_fit_is_refused_before_any_host_changes(tmp_path):
    model = build_tiny_model(tmp_path / "phi3", arch="phi3")
    runtime = {"max_context": 2048, "max_batch": 1, "prompt_cache_size": 100000, "prompt_cache_bytes": 64 << 30}
    inventory = two_rank_inventory(
        tmp_path,
        model,
        {
            "cluster_parallel": "pipeline",
            "cluster_runtime_settings": runtime,
            # these hosts are contacted (readiness reads their memory): the controller's Python
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "cluster_python": "{{ ansible_playbook_python }}",
        },
    )
    proc = ansible_playbook("site.yml", inventory=inventory, rcs=None, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "The model does not fit as placed; nothing was changed" in out, out[-3000:]
    # 64 GiB of prompt cache, half on each rank's 3 of 6 layers, on one machine shared by both ranks
    for host, rank in (("r0", 0), ("r1", 1)):
        assert f"{host}: rank {rank} needs" in out and "prompt cache 32.00 GiB" in out, out[-3000:]
    assert "GiB short" in out and "shared by 2 ranks" in out
    assert "a smaller prompt cache (cluster_runtime_settings prompt_cache_bytes, now 64.00 GiB" in out
    assert "PLAY [Mac hygiene" not in out and not (tmp_path / "prefix").exists()
