"""Security: an MLflow server with the basic-auth app and --allowed-hosts, credentials from a
mode-600 file (never params, tags or runtime_env), and no unsafe deserialisation anywhere."""

from __future__ import annotations

import ast
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from contrastlab import tracking
from contrastlab.sweep.runner import run_sweep, smoke_space
from contrastlab.sweep.space import load_space
from tests import ui

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-Pa55word-for-the-test"


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


_RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _reset_ray_token_cache() -> None:
    """Make this process re-read Ray's auth mode and token from the environment."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A basic-auth MLflow server, its client credentials in $HOME/.mlflow/credentials (600),
    and a local Ray started afterwards, so its workers see the same HOME and nothing else."""
    import ray

    tmp = tmp_path_factory.mktemp("auth")
    home = tmp / "home"
    (home / ".mlflow").mkdir(parents=True)
    creds = home / ".mlflow" / "credentials"
    creds.write_text(
        f"[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = {PASSWORD}\n"
    )
    creds.chmod(0o600)
    ini = tmp / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp}/auth.db\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # password hashing is deliberately slow (~1-4 s per check on 2 busy cores): cache it
        "auth_cache_ttl_seconds = 300\n"
    )
    port = ui.free_port()
    # Ray's own token auth, explicitly: the first ray.init of this pytest process (in another
    # test module) turned it on for the process and left its token in the *real* ~/.ray, which
    # the GCS started here would not find once HOME is swapped
    ray_token = tmp / "ray_auth_token"
    ray_token.write_text(secrets.token_hex(32))
    ray_token.chmod(0o600)
    saved = {k: os.environ.get(k) for k in ("HOME", *_RAY_AUTH_VARS)}
    os.environ.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(ray_token))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    _reset_ray_token_cache()
    try:
        with ui.mlflow_server(
            f"sqlite:///{tmp}/mlflow.db",
            tmp / "artifacts",
            port=port,
            extra_args=["--app-name", "basic-auth", "--allowed-hosts", f"127.0.0.1:{port}"],
            # the admin password reaches the server's environment only
            env={
                "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),  # CSRF key
            },
        ) as url:
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                configure_logging=False,
            )
            try:
                yield url, tmp, creds
            finally:
                ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reset_ray_token_cache()
        tracking.client.cache_clear()


@pytest.mark.slow
def test_server_refuses_requests_without_credentials_or_from_other_hosts(auth_server):
    url, _, _ = auth_server
    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(api) == 401  # no credentials
    import base64

    good = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    bad = base64.b64encode(b"admin:wrong").decode()
    assert _status(api, {"Authorization": f"Basic {good}"}) == 200
    assert _status(api, {"Authorization": f"Basic {bad}"}) == 401
    # DNS rebinding: a page on another name that resolves to 127.0.0.1 is refused
    assert _status(api, {"Authorization": f"Basic {good}", "Host": "evil.example.com"}) in (
        400,
        403,
    )


@pytest.mark.slow
def test_sweep_logs_with_file_credentials_and_never_records_them(auth_server, monkeypatch):
    url, tmp, _ = auth_server
    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"), trials=2, epochs=1)
    out = run_sweep(space, name="auth", storage_path=tmp / "sweeps", tracking_uri=url)
    assert [r["status"] for r in out.trials] == ["FINISHED", "FINISHED"]
    c = tracking.client(url)
    parent = c.get_run(out.parent_run_id)
    runs = [parent, *tracking.child_runs(url, parent.info.experiment_id, out.parent_run_id)]
    assert len(runs) == 3
    for r in runs:
        values = [*r.data.params.values(), *r.data.tags.values()]
        assert not any(PASSWORD in v for v in values), r.info.run_name


@pytest.mark.slow
def test_wrong_or_exposed_credentials_stop_the_sweep_before_any_trial(auth_server, tmp_path):
    url, _, creds = auth_server
    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"), trials=1, epochs=1)
    creds.chmod(0o644)
    try:
        with pytest.raises(tracking.TrackingError, match=r"readable by other users.*chmod 600"):
            run_sweep(space, name="exposed", storage_path=tmp_path, tracking_uri=url)
    finally:
        creds.chmod(0o600)
    text = creds.read_text()
    creds.write_text(text.replace(PASSWORD, "wrong"))
    tracking.client.cache_clear()
    try:
        with pytest.raises(tracking.TrackingError, match="refused the credentials"):
            run_sweep(space, name="wrong", storage_path=tmp_path, tracking_uri=url)
    finally:
        creds.write_text(text)
        tracking.client.cache_clear()


def _calls(name: str):
    """Every call of ``name`` (e.g. ``yaml.load``) in the package, pipelines and scripts."""
    files = [*(ROOT / "platform").rglob("*.py"), *(ROOT / "pipelines").glob("*.py")]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield f, node


def test_yaml_is_only_read_with_safe_loaders():
    from contrastlab.sweep.spec import UniqueKeyLoader

    assert issubclass(UniqueKeyLoader, __import__("yaml").SafeLoader)
    for f, node in _calls("yaml.load"):
        loader = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("Loader")
        assert loader in ("UniqueKeyLoader", "yaml.SafeLoader"), f"{f}:{node.lineno}"
    assert not list(_calls("yaml.unsafe_load")) and not list(_calls("yaml.full_load"))


def test_checkpoints_are_only_loaded_weights_only():
    calls = list(_calls("torch.load"))
    assert calls, "expected the checkpoint loader"
    for f, node in calls:
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert kw.get("weights_only") == "True", (
            f"{f}:{node.lineno} torch.load without weights_only"
        )
    assert not list(_calls("pickle.load")) and not list(_calls("pickle.loads"))
