"""The cluster secret a multi-rank group must have: where it comes from and what is refused."""

from __future__ import annotations

import pytest

from mlx_jaccl_cluster.launch import write_secret
from mlx_jaccl_cluster.settings import Settings


def _settings(tmp_path, **kw) -> Settings:
    return Settings(model=tmp_path, world_size=2, rank=1, control="127.0.0.1:32400", **kw)


def test_a_group_without_a_secret_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="needs a cluster secret: set MJC_CLUSTER_SECRET_FILE"):
        _settings(tmp_path)


def test_one_rank_needs_no_secret(tmp_path):
    assert Settings(model=tmp_path, world_size=1).world_size == 1


def test_the_secret_file_must_be_private_and_long_enough(tmp_path):
    path = write_secret(tmp_path / "secret")
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(_settings(tmp_path, cluster_secret_file=path).secret()) == 48
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others.*chmod 600"):
        _settings(tmp_path, cluster_secret_file=path)
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ValueError, match="3 characters; use at least 16"):
        _settings(tmp_path, cluster_secret_file=short)
    with pytest.raises(ValueError, match="cannot be read"):
        _settings(tmp_path, cluster_secret_file=tmp_path / "missing")


def test_the_secret_never_shows_in_the_settings_repr(tmp_path):
    s = _settings(tmp_path, cluster_secret="s" * 20)
    assert "s" * 20 not in repr(s) and "s" * 20 not in str(s.model_dump())
