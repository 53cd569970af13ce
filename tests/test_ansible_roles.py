"""The roles in ansible/: their layout, and the contract between the generated inventory and them.

Real: the role files on disk, ansible-playbook's own syntax check, the inventory generator.
ansible-lint (production profile) and yamllint run in `make lint`; this checks that their
configuration skips nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from generators.ansible_inventory import render_inventory
from gpufleet.spec.stack import StackSpec
from tests.conftest import PROJECT_ROOT

ANSIBLE = PROJECT_ROOT / "ansible"
ROLES = [
    *("base", "nvidia_driver", "cuda_toolkit", "docker_engine", "nvidia_container_toolkit"),
    "serving_stack",
]


def role_defaults(role: str) -> dict[str, object]:
    loaded = yaml.safe_load((ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_lint_configuration_uses_the_production_profile_and_skips_nothing() -> None:
    config = yaml.safe_load((PROJECT_ROOT / ".ansible-lint").read_text())
    assert config["profile"] == "production"
    for key in ("skip_list", "warn_list"):
        assert not config.get(key), f".ansible-lint must not set {key}: {config.get(key)}"
    excluded = [path for path in config.get("exclude_paths", []) if path.startswith("ansible")]
    assert not excluded, "nothing under ansible/ escapes the linter"


def test_every_role_has_its_readme_defaults_and_playbook() -> None:
    for role in ROLES:
        directory = ANSIBLE / "roles" / role
        readme = (directory / "README.md").read_text()
        defaults = role_defaults(role)
        assert defaults, f"{role} has no tunables"
        for name in defaults:
            assert name.startswith(f"{role}_"), f"{role}/defaults/main.yml: {name} lacks the prefix"
            assert name in readme, f"{role}/README.md does not document {name}"
        assert (ANSIBLE / "playbooks" / f"{role}.yml").is_file()


def _imported(playbook: str) -> list[str]:
    entries = yaml.safe_load((ANSIBLE / playbook).read_text())
    return [Path(entry["ansible.builtin.import_playbook"]).stem for entry in entries]


def test_site_imports_one_playbook_per_role_in_order() -> None:
    """host.yml (the lifecycle's configure step) is every role but the serving stack, which
    the deploy step runs; site.yml (`gpufleet configure`) is both, in that order."""
    assert _imported("site.yml") == ["host", "serving_stack"]
    assert [*_imported("host.yml"), "serving_stack"] == ROLES


def test_the_playbooks_pass_ansible_syntax_check(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    gpu-a:\n      ansible_host: 127.0.0.1\n")
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            *("--syntax-check", "-i", str(inventory), str(ANSIBLE / "site.yml")),
        ],
        env={"ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_role_variable_the_inventory_sets_is_a_role_default(tmp_path: Path) -> None:
    """A renamed role variable must not leave the generated inventory setting a dead name."""
    spec = StackSpec.model_validate(
        {
            "environment": "static",
            "hosts": [{"name": "gpu-a", "address": "10.0.0.5", "gpus": {"model": "h100"}}],
            "host_config": {"cuda_version": "12.4", "driver_branch": "550"},
            "serving": {},
            "registry": {"tracking_uri": "https://mlflow.example.internal"},
        }
    )
    inventory = render_inventory("lab", spec, project_root=tmp_path)["all"]
    variables = {**inventory["vars"], **inventory["hosts"]["gpu-a"]}
    defaults = {name for role in ROLES for name in role_defaults(role)}
    role_variables = {name for name in variables if not name.startswith(("ansible_", "gpufleet_"))}
    assert role_variables, "the inventory sets role variables"
    assert role_variables - defaults == set()


def test_the_driver_branch_map_covers_every_gpu_family() -> None:
    by_family = role_defaults("nvidia_driver")["nvidia_driver_branch_by_family"]
    assert isinstance(by_family, dict)
    assert set(by_family) == {"t4", "a10", "h100", "default"}
    assert all(str(branch).isdigit() for branch in by_family.values())
