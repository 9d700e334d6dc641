"""Ansible filters over the ``mlx_cluster`` inventory.

``mjc_validate_cluster``: list of problem strings (empty when the inventory is good).
``mjc_cluster_plan``: the rendered plan every role reads (fails on a bad inventory).
``mjc_group_overrides``: ``host: key`` of group variables a host sees differently.

Both take a mapping inventory hostname -> host variables; in a play::

    dict(groups['mlx_cluster'] | zip(groups['mlx_cluster'] | map('extract', hostvars)))

The group variables default to the values most hosts see (Ansible merges group_vars
into every host's variables); a host that sets one differently is reported.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

try:
    from mlx_jaccl_cluster.ops import checks, plan, schema
except ImportError:  # not installed on the controller: use the repository's copy
    sys.path.insert(
        0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "runtime"))
    )
    from mlx_jaccl_cluster.ops import checks, plan, schema

from ansible.errors import AnsibleFilterError


def _plain_hosts(hosts: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Only the schema's variables of each host (hostvars hold far more, some lazily templated)."""
    if not isinstance(hosts, Mapping):
        raise AnsibleFilterError(f"expected a mapping of hostname -> host variables, got {type(hosts).__name__}")
    return {
        str(name): {key: variables[key] for key in schema.INVENTORY_KEYS if key in variables}
        for name, variables in hosts.items()
    }


def _group_vars(hosts: Mapping[str, Mapping[str, Any]], group: Mapping[str, Any] | None) -> dict[str, Any]:
    """The group variables: as given, else the value most hosts see (the first host's on a tie)."""
    if group is not None:
        return {key: group[key] for key in schema.GROUP_DEFAULTS if key in group}
    derived = {}
    for key in schema.GROUP_DEFAULTS:
        values = [schema.setting(variables, key) for variables in hosts.values()]
        derived[key] = max(values, key=lambda v: sum(repr(other) == repr(v) for other in values), default=None)
    return derived


def mjc_validate_cluster(
    hosts: Mapping[str, Mapping[str, Any]],
    group: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    sources: Mapping[str, Any] | None = None,
) -> list[str]:
    """Problems of the inventory as ``host: field: message — fix`` strings.

    ``model_config``: the model's config.json; by default read from the model's folder on
    the controller when it is there (the model-vs-layout checks).
    ``sources``: ``ansible-inventory --list --export`` output, so that a value set by another
    group is blamed on that group.
    """
    plain = _plain_hosts(hosts)
    group_vars = _group_vars(plain, group)
    if model_config is None:
        model_config = _model_config(plan.controller_model_dir(group_vars))
    problems = checks.validate_cluster(plain, group_vars, model_config, sources)
    return [str(p) for p in problems]


def _model_config(folder: str | None) -> dict[str, Any] | None:
    """The model's config.json on the controller, once fetched (None before: its checks wait)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:  # type: ignore[arg-type]
            return json.load(f)
    except (TypeError, OSError, ValueError):
        return None


def mjc_group_overrides(hosts: Mapping[str, Mapping[str, Any]], group: Mapping[str, Any] | None = None) -> list[str]:
    """``host: key`` for each group variable some host sees differently from the others."""
    plain = _plain_hosts(hosts)
    return checks.group_overrides(plain, _group_vars(plain, group))


def mjc_cluster_plan(
    hosts: Mapping[str, Mapping[str, Any]], group: Mapping[str, Any] | None = None, name: str | None = None
) -> dict[str, Any]:
    """The cluster plan (see ``mlx_jaccl_cluster.ops.plan.cluster_plan``); ``name``: the
    cluster's name when the inventory sets no ``cluster_name`` (its folder's name)."""
    plain = _plain_hosts(hosts)
    try:
        return plan.cluster_plan(plain, _group_vars(plain, group), name)
    except ValueError as exc:
        raise AnsibleFilterError(str(exc)) from None


class FilterModule:
    """Registers the mjc_* inventory filters."""

    def filters(self) -> dict[str, Any]:
        return {
            "mjc_validate_cluster": mjc_validate_cluster,
            "mjc_cluster_plan": mjc_cluster_plan,
            "mjc_group_overrides": mjc_group_overrides,
        }
