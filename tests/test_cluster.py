"""cluster.yaml: checked offline, against Ray's own schema, the way `ray up` checks it.

`ray up` runs `prepare_config` (merge with the provider's defaults.yaml, merge setup commands,
fill per-type worker limits) and then `validate_config` (JSON schema
ray/autoscaler/ray-schema.json). Both are pure Python: no boto3, no AWS credentials, no
network. What `ray up` does after that (autodetect instance resources, create IAM role,
key pair, security group) needs AWS and is not covered here.
"""

from __future__ import annotations

import copy
import re
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"

SENSITIVE_PORTS = (5000, 6379, 8265, 10001)  # MLflow, GCS, dashboard/Jobs API, Ray client


def _raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared(cfg: dict | None = None) -> dict:
    """What `ray up` validates: the file merged with Ray's AWS defaults."""
    return prepare_config(copy.deepcopy(cfg if cfg is not None else _raw()))


@pytest.fixture(scope="module")
def prepared() -> dict:
    return _prepared()


def _all_commands(cfg: dict) -> list[tuple[str, str]]:
    """(where, command) for every shell command the launcher would run, any node type."""
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    out = [(key, cmd) for key in keys for cmd in cfg.get(key, [])]
    for name, node_type in cfg["available_node_types"].items():
        for key in ("initialization_commands", "worker_setup_commands"):
            out += [(f"{name}.{key}", cmd) for cmd in node_type.get(key, [])]
    docker = cfg.get("docker", {})
    for key in ("run_options", "head_run_options", "worker_run_options"):
        out += [(f"docker.{key}", opt) for opt in docker.get(key, [])]
    return out


def _head_and_workers(cfg: dict) -> tuple[dict, dict[str, dict]]:
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    return types[head], {k: v for k, v in types.items() if k != head}


# --- the file is what Ray accepts -------------------------------------------------------


def test_cluster_yaml_passes_rays_own_validation(prepared):
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError if not
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _unknown_top_level_key(cfg):
    cfg["idle_timeout_minute"] = 5  # typo of idle_timeout_minutes


def _unknown_node_type_key(cfg):
    _, workers = _head_and_workers(cfg)
    next(iter(workers.values()))["max_worker"] = 2  # typo of max_workers


def _fractional_gpu(cfg):
    _, workers = _head_and_workers(cfg)
    next(iter(workers.values()))["resources"]["GPU"] = 0.5


def _string_cpu(cfg):
    head, _ = _head_and_workers(cfg)
    head["resources"]["CPU"] = "8"


def _negative_gpu(cfg):
    head, _ = _head_and_workers(cfg)
    head["resources"]["GPU"] = -1


def _unknown_docker_key(cfg):
    cfg["docker"]["gpus"] = "all"


@pytest.mark.parametrize(
    "break_it",
    [
        _unknown_top_level_key,
        _unknown_node_type_key,
        _fractional_gpu,
        _string_cpu,
        _negative_gpu,
        _unknown_docker_key,
    ],
)
def test_broken_copy_is_rejected_by_the_same_validation(break_it):
    cfg = _raw()
    break_it(cfg)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(_prepared(cfg))


def test_no_ray_default_commands_leak_in(prepared):
    # prepare_config merges top-level keys with aws/defaults.yaml; a command list left out of
    # cluster.yaml would silently become Ray's (nightly wheel install, dashboard on 0.0.0.0).
    raw = _raw()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert prepared[key] == raw[key], key
    assert prepared["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    assert prepared["worker_setup_commands"] == raw["setup_commands"] + raw["worker_setup_commands"]
    for where, cmd in _all_commands(prepared):
        assert "ray-wheels" not in cmd and "0.0.0.0" not in cmd, (where, cmd)


# --- security -----------------------------------------------------------------------------


def _ray_starts(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


def test_dashboard_listens_on_loopback_only(prepared):
    (head_start,) = _ray_starts(prepared["head_start_ray_commands"])
    assert "--head" in head_start
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    assert hosts == ["127.0.0.1"], head_start
    for where, cmd in _all_commands(prepared):
        for host in re.findall(r"--dashboard-host[= ](\S+)", cmd):
            assert host == "127.0.0.1", (where, cmd)


def test_every_ray_start_runs_with_token_auth(prepared):
    head = _ray_starts(prepared["head_start_ray_commands"])
    workers = _ray_starts(prepared["worker_start_ray_commands"])
    assert head and workers
    for cmd in head + workers:
        # the variable is set for this very `ray start`, not left to ~/.bashrc
        assert re.search(r"(^|[;&|(]\s*|\s)RAY_AUTH_MODE=token\s+ray start\b", cmd), cmd
        assert "RAY_AUTH_MODE=disabled" not in cmd


def test_same_token_file_on_every_node_owner_only(prepared):
    # One local token file, mounted at Ray's default path on the head and (via the head)
    # on every worker; tightened to 0600 by a setup command that runs on both.
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(
            re.search(r"chmod (0?600|u=rw,go=) ~/\.ray/auth_token", c) for c in prepared[key]
        ), key


def test_no_literal_token_or_password_in_commands(prepared):
    secret = re.compile(
        r"RAY_AUTH_TOKEN\s*=|password|passwd|secret|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN"
        r"|MLFLOW_TRACKING_PASSWORD|\b[0-9a-fA-F]{32,}\b",
        re.IGNORECASE,
    )
    for where, cmd in _all_commands(prepared):
        assert not secret.search(cmd), (where, cmd)
    assert not any("RAY_AUTH_TOKEN" in str(v) for v in prepared["file_mounts"].values())
    # and this machine's own token (if any) is nowhere in the file
    local_token = Path("~/.ray/auth_token").expanduser()
    if local_token.is_file() and local_token.read_text().strip():
        assert local_token.read_text().strip() not in CLUSTER_YAML.read_text()


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    return int(rule.get("FromPort", -1)) <= port <= int(rule.get("ToPort", -1))


def test_no_ingress_rule_opens_ray_or_mlflow_ports(prepared):
    rules = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        for port in SENSITIVE_PORTS:
            assert not _covers(rule, port), (port, rule)


# --- node types -----------------------------------------------------------------------------


def test_gpu_workers_and_a_cpu_head(prepared):
    head, workers = _head_and_workers(prepared)
    for node_type in prepared["available_node_types"].values():
        for name, amount in node_type["resources"].items():
            assert type(amount) is int and amount >= 0, (name, amount)
    assert head["resources"].get("GPU") == 0 and head["resources"]["CPU"] > 0
    assert head["max_workers"] == 0
    gpu_types = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no worker node type advertises GPUs"
    assert all(t["resources"]["CPU"] >= t["resources"]["GPU"] for t in gpu_types)
    assert 1 <= max(t["max_workers"] for t in gpu_types) <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0


def test_cpu_only_workers_for_streamed_decoding(prepared):
    """A CPU-only worker type for Ray Data decode tasks: no GPU advertised, the CPU image,
    and no `--gpus all` (which fails on an instance without a GPU); the node-type docker
    keys replace the global ones, as Ray's autoscaler merges them."""
    _, workers = _head_and_workers(prepared)
    cpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) == 0}
    assert cpu_types, "no CPU-only worker node type for decode tasks"
    raw = _raw()
    ray_pin = raw["docker"]["worker_image"].split(":")[1].rsplit("-py", 1)[0]
    for name, t in cpu_types.items():
        assert t["resources"]["CPU"] >= 8 and t["min_workers"] == 0, name
        docker = {**raw["docker"], **t.get("docker", {})}
        assert docker["worker_image"] == f"rayproject/ray:{ray_pin}-py311-cpu", name
        assert not any("--gpus" in o for o in docker["worker_run_options"]), name
        assert t["node_config"]["IamInstanceProfile"]["Name"] == "contrastlab-ray-worker"
    total = sum(t["max_workers"] for t in workers.values())
    assert total <= prepared["max_workers"]  # every type can reach its own maximum


# --- the project, at this version ----------------------------------------------------------


def test_setup_installs_this_checkout_with_the_lock_file(prepared):
    assert prepared["file_mounts"].get("~/contrastlab") == "."
    assert (ROOT / "requirements.lock").is_file() and (ROOT / "pyproject.toml").is_file()
    install = re.compile(r"pip install -c ~/contrastlab/requirements\.lock -e ~/contrastlab\b")
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(c) for c in prepared[key]), key
    # what is synced skips the virtualenv and other ignored files
    assert ".gitignore" in prepared["rsync_filter"]
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()


def test_cluster_runs_the_locked_ray_and_python():
    lock = (ROOT / "requirements.lock").read_text()
    (ray_pin,) = re.findall(r"^ray==(\S+)$", lock, re.MULTILINE)
    assert ray_pin == version("ray")
    docker = _raw()["docker"]
    for key in ("head_image", "worker_image"):
        assert docker[key].startswith(f"rayproject/ray:{ray_pin}-py311-"), docker[key]
    assert docker["worker_image"].endswith("-gpu")
