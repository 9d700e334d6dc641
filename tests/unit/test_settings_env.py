"""Runtime defaults are written once, on ``Settings``; a rank's environment is written by
``settings_env`` and read back by ``Settings`` as the same values."""

from __future__ import annotations

import inspect
import os

import pytest

from mlx_jaccl_cluster.cluster import Follower, Leader
from mlx_jaccl_cluster.settings import Settings, settings_env


def test_the_environment_reads_back_as_the_same_settings(tmp_path, monkeypatch):
    env = settings_env(
        model=tmp_path,
        backend="ring",
        parallel="pipeline",
        pipeline_split=[2, 3],
        world_size=2,
        control="127.0.0.1:32400",
        cluster_secret="s" * 24,
        peer_ips=["127.0.0.1", "127.0.0.2"],
        api_port=9123,
        generic_pipeline=True,
        max_context=None,
    )
    assert env["MJC_PIPELINE_SPLIT"] == "2,3" and env["MJC_GENERIC_PIPELINE"] == "true"
    assert "MJC_MAX_CONTEXT" not in env  # None: the field keeps its default
    for name in [k for k in os.environ if k.startswith(("MJC_", "MLX_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings(_cli_parse_args=[])
    assert (s.model, s.pipeline_split, s.peer_ips, s.api_port, s.generic_pipeline) == (
        tmp_path,
        [2, 3],
        ["127.0.0.1", "127.0.0.2"],
        9123,
        True,
    )
    assert s.max_context == Settings.default("max_context") and s.secret() == b"s" * 24


def test_an_unknown_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="api_prot is not an mjc-rank setting"):
        settings_env(api_prot=1)


@pytest.mark.parametrize("cls", [Leader, Follower])
def test_the_control_channel_takes_its_timing_defaults_from_settings(cls):
    params = inspect.signature(cls).parameters
    for arg, field in [
        ("heartbeat_interval", "heartbeat_interval"),
        ("heartbeat_misses", "heartbeat_misses"),
        ("log_every", "rendezvous_log_every"),
    ]:
        assert params[arg].default == Settings.default(field) == Settings.model_fields[field].default


def test_a_step_token_budget_that_leaves_no_prefill_is_refused_naming_both_fields(tmp_path):
    with pytest.raises(ValueError, match=r"step_token_budget \(8\) must be larger than max_batch \(8\)"):
        Settings(_cli_parse_args=[], model=tmp_path, step_token_budget=8, max_batch=8)
    s = Settings(_cli_parse_args=[], model=tmp_path, step_token_budget=9, max_batch=8)
    assert s.step_token_budget == 9
    assert Settings.default("step_token_budget") > Settings.default("max_batch")
