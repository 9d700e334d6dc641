"""Every role keeps its contract: defaults, meta/argument_specs.yml with the same keys, phased
tasks and a README (as prometheus-community/ansible checks in its CI)."""

from pathlib import Path

import pytest
import yaml

ROLES = sorted(p for p in (Path(__file__).resolve().parents[2] / "roles").iterdir() if p.is_dir())


def test_there_are_roles():
    assert {"preflight", "node_readiness", "python_env", "backend_config", "model", "service"} <= {
        r.name for r in ROLES
    }


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_defaults_match_argument_specs_key_for_key(role):
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    options = specs["main"].get("options", {})
    assert set(defaults) == set(options), f"{role.name}: defaults and argument_specs differ"
    for name, spec in options.items():
        assert spec.get("description"), f"{role.name}: {name} has no description"
        assert spec.get("type"), f"{role.name}: {name} has no type"


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_role_has_tasks_and_readme(role):
    assert (role / "tasks" / "main.yml").is_file()
    readme = role / "README.md"
    assert readme.is_file(), f"{role.name} has no README.md"
    text = readme.read_text()
    for name in yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}:
        assert name in text, f"{role.name}/README.md does not document {name}"


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_public_variables_are_prefixed_with_the_role_name(role):
    for name in yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}:
        assert name.startswith(role.name + "_"), f"{role.name}: {name} should start with {role.name}_"
