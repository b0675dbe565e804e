"""MLflow: one parent run per sweep, one nested child run per trial, provenance on both.

The driver owns the parent run and, after the sweep, settles every child's end state (a trial
stopped by ASHA or killed with its worker never gets to close its own run). A trial owns its
child run: params, per-epoch metrics, the resolved config and the final checkpoint. A restarted
trial finds its existing child run by the ``contrastlab.trial_id`` tag instead of opening a
second one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

TRIAL_TAG = "contrastlab.trial_id"
SWEEP_TAG = "contrastlab.sweep"
KIND_TAG = "contrastlab.kind"  # "sweep" | "ablation" | "reproduction"
PARENT_TAG = "mlflow.parentRunId"
PACKAGES = ("contrastlab", "torch", "torchvision", "ray", "optuna", "mlflow", "numpy", "pydantic")


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message says which URI and why."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs cwd>/mlflow.db``.

    Relative sqlite paths are made absolute: inside a Ray job the working directory is a
    temporary copy, and a relative store would vanish with it.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    elif "://" not in uri:  # a bare path: a local sqlite file
        uri = "sqlite:///" + str(Path(uri).resolve())
    return uri


def default_artifact_location(uri: str) -> str | None:
    """For a local sqlite store, artifacts go to ``mlartifacts/`` beside the database.

    Servers choose their own artifact store (``--artifacts-destination``); None then.
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def credentials_file() -> Path:
    """Where MLflow's client reads a username/password (ini section ``[mlflow]``)."""
    return Path(os.path.expanduser("~/.mlflow/credentials"))


def check_credentials() -> None:
    """Refuse a credentials file that others can read (as ssh does with a private key).

    Credentials reach MLflow's client from ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` in the environment of the processes (on a cluster: of
    ``ray start``), or from ``~/.mlflow/credentials``; never from a job's ``runtime_env``,
    whose variables ``ray job list`` shows to anyone with dashboard access.
    """
    path = credentials_file()
    if path.is_file() and path.stat().st_mode & 0o077:
        raise TrackingError(
            f"{path} holds MLflow credentials but is readable by other users "
            f"(mode {path.stat().st_mode & 0o777:o}); run: chmod 600 {path}"
        )


def _check_authorised(uri: str) -> None:
    """One cheap authenticated call: a server with an auth app refuses missing credentials."""
    from mlflow.exceptions import MlflowException

    try:
        client(uri).search_experiments(max_results=1)
    except MlflowException as e:
        text = str(e)
        if "401" in text or "403" in text or "nauthori" in text or "ermission" in text:
            raise TrackingError(
                f"MLflow server {uri} refused the credentials ({text.splitlines()[0][:200]}); "
                "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD in the environment or "
                f"write them to {credentials_file()} (mode 600)"
            ) from None
        raise


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any trial runs, if the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        check_credentials()
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered /health with {r.status}")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(
                f"MLflow server {uri} is unreachable ({e}); start it or set "
                "MLFLOW_TRACKING_URI / --tracking-uri to a reachable store"
            ) from None
        _check_authorised(uri)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow sqlite store {uri}: folder {folder} is not writable")


@functools.cache
def client(uri: str):
    """One client per URI and process: a sqlite store checks its schema on every new client."""
    from mlflow.tracking import MlflowClient

    # no per-download progress bars in reports and reproductions
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Id of experiment ``name``, created (with the default artifact location) if missing."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=default_artifact_location(uri))


# --------------------------------------------------------------------------- provenance


@functools.cache
def source_digest() -> str:
    """sha256 over the package's Python sources: identifies the code even without git.

    Computed once per process, so it names the code this process imported even if the files
    are edited while it runs."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def git_state(cwd: Path | None = None) -> dict[str, str]:
    """Commit and dirty diff of the checkout holding the package, when it is a git checkout."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": os.environ.get("CONTRASTLAB_GIT_SHA", "unknown"), "git_diff": ""}
    return {"git_sha": sha, "git_diff": diff}


def provenance() -> dict[str, Any]:
    """Where and with what a run ran: code identity, package versions, hardware."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    git = git_state()
    return {
        "git_sha": git["git_sha"],
        "git_dirty": bool(git["git_diff"]),
        "git_diff": git["git_diff"],
        "source_sha256": source_digest(),
        "packages": versions,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "gpu": gpu,
        "cuda": torch.version.cuda or "none",
    }


def provenance_tags(prov: Mapping[str, Any]) -> dict[str, str]:
    tags = {
        "contrastlab.git_sha": prov["git_sha"],
        "contrastlab.git_dirty": str(prov["git_dirty"]),
        "contrastlab.source_sha256": prov["source_sha256"],
        "contrastlab.gpu": prov["gpu"],
        "contrastlab.host": prov["host"],
    }
    tags.update({f"version.{k}": v for k, v in prov["packages"].items()})
    return tags


# --------------------------------------------------------------------------- runs


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [
        Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in params.items()
    ]
    c = client(uri)
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run_id, params=items[i : i + 100])


def param_value(text: str | None) -> Any:
    """A param as logged (MLflow keeps params as text) back to its value: '64' -> 64."""
    if text is None:
        return None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and k != "epoch"
    ]
    if batch:
        client(uri).log_batch(run_id, metrics=batch)


def find_child(uri: str, exp_id: str, parent_id: str, trial_id: str) -> str | None:
    runs = client(uri).search_runs(
        [exp_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
    )
    return runs[0].info.run_id if runs else None


def find_parent(uri: str, exp_id: str, sweep: str) -> str | None:
    """The parent run of sweep ``sweep`` (tagged with its name, and no parent itself)."""
    runs = client(uri).search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'")
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    return parents[0].info.run_id if parents else None


def child_runs(uri: str, exp_id: str, parent_id: str) -> list[Any]:
    return client(uri).search_runs(
        [exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=10_000
    )


def undelivered(
    uri: str, run_id: str, pending: list[tuple[int, dict[str, float]]]
) -> list[tuple[int, dict[str, float]]]:
    """The pending epochs the server does not hold yet (a request whose answer was lost may
    have been stored all the same)."""
    c = client(uri)
    seen: dict[str, set[int]] = {}
    keep = []
    for epoch, metrics in pending:
        key = next((k for k in metrics if k != "epoch"), None)
        if key is not None and key not in seen:
            seen[key] = {m.step for m in c.get_metric_history(run_id, key)}
        if key is None or epoch not in seen[key]:
            keep.append((epoch, metrics))
    return keep


class TrialRun:
    """The child run of one trial (created once, reopened when the trial restarts).

    Metrics that cannot be sent (the server is down) are kept, written to ``spool`` so that a
    person can see exactly what is missing, and sent with the next successful call.
    """

    def __init__(
        self,
        uri: str,
        exp_id: str,
        parent_id: str,
        trial_id: str,
        trial_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        spool: Path | None = None,
    ) -> None:
        self.uri = uri
        c = client(uri)
        existing = find_child(uri, exp_id, parent_id, trial_id)
        self.created = existing is None
        if existing is None:
            run = c.create_run(
                exp_id,
                run_name=trial_name,
                tags={PARENT_TAG: parent_id, TRIAL_TAG: trial_id, **(tags or {})},
            )
            self.run_id = run.info.run_id
            log_params(uri, self.run_id, params)
        else:  # a restarted trial continues its own run
            self.run_id = existing
            c.update_run(self.run_id, status="RUNNING")
        # epochs already in MLflow: a restarted trial re-trains those after its last checkpoint
        # (bit for bit on CPU) and must not log them twice. MLflow cannot delete a logged
        # value, so a re-trained epoch whose loss differs (GPU non-determinism) is not logged
        # again either; the run is tagged with the epochs that differ (see log_epoch)
        hist = c.get_metric_history(self.run_id, "loss") if not self.created else []
        self.logged_loss = {m.step: m.value for m in hist}
        self.logged_through = max(self.logged_loss, default=-1)
        self.retrained_differ: list[int] = []
        self.pending: list[tuple[int, dict[str, float]]] = []
        # tags not sent yet (the server was down), the newest value of each: sent by flush()
        self.pending_tags: dict[str, str] = {}
        self.spool = spool
        self._uncertain = False

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Log one epoch's metrics; while the server is unreachable they wait in ``pending``
        (and in the spool file) and go out, in order, with the next call that succeeds."""
        if epoch <= self.logged_through and epoch > 0:
            logged = self.logged_loss.get(epoch)
            if logged is not None and "loss" in metrics and float(metrics["loss"]) != logged:
                self.retrained_differ.append(epoch)
                self.set_tag(
                    "contrastlab.retrained_epochs_differ",
                    json.dumps(self.retrained_differ)
                    + ": trained again after a restart with another loss than logged; "
                    "MLflow keeps the first values, the run directory's metrics.jsonl "
                    "the new ones",
                )
            return
        self.pending.append((epoch, dict(metrics)))
        self.flush()

    def flush(self) -> bool:
        """Send the pending epochs; False (and they stay pending) if the store is down."""
        try:
            if self._uncertain and self.pending:
                self._drop_delivered()
            while self.pending:
                epoch, metrics = self.pending[0]
                log_metrics(self.uri, self.run_id, metrics, step=epoch)
                self.pending.pop(0)
                self.logged_through = max(self.logged_through, epoch)
            while self.pending_tags:
                key = next(iter(self.pending_tags))
                client(self.uri).set_tag(self.run_id, key, self.pending_tags[key])
                del self.pending_tags[key]
        except Exception as e:  # connection refused, timeouts, 5xx after retries
            # a request that failed on the way back may still have been stored
            self._uncertain = True
            self._spool(f"{type(e).__name__}: {str(e)[:300]}")
            return False
        self._uncertain = False
        self._spool(None)
        return True

    def set_tag(self, key: str, value: str) -> None:
        """Set a tag on the run (MLflow keeps at most 5,000 characters); while the server is
        unreachable it waits, like the metrics, and goes out with the next flush."""
        self.pending_tags[key] = value[:5000]
        self.flush()

    def _drop_delivered(self) -> None:
        self.pending = undelivered(self.uri, self.run_id, self.pending)

    def _spool(self, error: str | None) -> None:
        if self.spool is None:
            return
        if not self.pending:
            self.spool.unlink(missing_ok=True)
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        self.spool.write_text(
            json.dumps({"run_id": self.run_id, "error": error, "pending": self.pending}, indent=1)
        )

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        client(self.uri).log_artifact(self.run_id, str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        client(self.uri).log_text(self.run_id, text, name)

    def end(self, status: str, reason: str | None = None) -> None:
        c = client(self.uri)
        if reason:
            c.set_tag(self.run_id, "contrastlab.end_reason", reason[:5000])
        c.set_terminated(self.run_id, status)
