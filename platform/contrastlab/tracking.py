"""MLflow: one parent run per sweep, one nested child run per trial, provenance on both.

The driver owns the parent run and, after the sweep, settles every child's end state (a trial
stopped by ASHA or killed with its worker never gets to close its own run). A trial owns its
child run: params, per-epoch metrics, the resolved config and the final checkpoint. A restarted
trial finds its existing child run by the ``contrastlab.trial_id`` tag instead of opening a
second one.
"""

from __future__ import annotations

import contextlib
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
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

TRIAL_TAG = "contrastlab.trial_id"
SWEEP_TAG = "contrastlab.sweep"
KIND_TAG = "contrastlab.kind"  # "sweep" | "ablation" | "reproduction" | "train"
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


def find_child(uri: str, exp_id: str, parent_id: str | None, trial_id: str) -> str | None:
    """The run of trial ``trial_id`` under ``parent_id``; with ``parent_id`` None, the
    parentless run (a ``contrastlab train`` run) tagged with ``trial_id``."""
    query = f"tags.`{TRIAL_TAG}` = '{trial_id}'"
    if parent_id is not None:
        query = f"tags.`{PARENT_TAG}` = '{parent_id}' and {query}"
    runs = client(uri).search_runs([exp_id], filter_string=query)
    if parent_id is None:
        runs = [r for r in runs if PARENT_TAG not in r.data.tags]
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
    """The child run of one trial (created once, reopened when the trial restarts); with
    ``parent_id`` None, a run of its own (``contrastlab train --tracking-uri``).

    Metrics that cannot be sent (the server is down) are kept, written to ``spool`` so that a
    person can see exactly what is missing, and sent with the next successful call.
    """

    def __init__(
        self,
        uri: str,
        exp_id: str,
        parent_id: str | None,
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
            parent = {PARENT_TAG: parent_id} if parent_id is not None else {}
            run = c.create_run(
                exp_id, run_name=trial_name, tags={**parent, TRIAL_TAG: trial_id, **(tags or {})}
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
        self.ended = False  # end() was called: FINISHED, FAILED or KILLED is recorded

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
        self.ended = True


# --------------------------------------------------------------------------- a training run's life
# Shared by sweep trials (sweep/runner.py) and hand runs (`contrastlab train --tracking-uri`),
# so that both land in MLflow the same way: params, per-epoch metrics, config, checkpoint, end
# state.

DIAGNOSIS_TAG = "contrastlab.diagnosis"
"""MLflow tag of a run: what :func:`contrastlab.evaluate.diagnose` said (a shortcut, a
collapse), one message per line; absent when it said nothing."""
THREADS_TAG = "contrastlab.torch_threads"
"""CPU threads the run trained with: float reduction order depends on it, so ``contrastlab
reproduce`` uses the same count again."""
OUTAGE_WAIT_S = float(os.environ.get("CONTRASTLAB_MLFLOW_OUTAGE_WAIT_S", "120"))
"""How long a finishing run waits for an unreachable MLflow server before giving up on it."""
PENDING_FILE = "mlflow_pending.json"
"""Spool file, in the run directory, of the metrics not sent yet (see :class:`TrialRun`)."""
TRAIN_RUN_FILE = "mlflow_run.json"
"""In a ``contrastlab train --tracking-uri`` run directory: which MLflow run it logs to."""
TRAIN_EXPERIMENT = "contrastlab-train-{method}"
"""Default MLflow experiment of ``contrastlab train --tracking-uri`` runs."""


def open_run(
    uri: str,
    exp_id: str,
    parent_id: str | None,
    trial_id: str,
    name: str,
    cfg: Any,
    tags: Mapping[str, str],
    spool: Path | None,
) -> TrialRun:
    """Create (or, for a restarted trial or resumed run, reopen) the MLflow run of one training
    run of ``cfg`` (a :class:`~contrastlab.config.Config`): its params, the tags every run
    carries plus ``tags``, and, once, the resolved config to reproduce it from."""
    # a run must not stall for minutes in MLflow's retry loop while the server is down:
    # it keeps training and spools (see TrialRun); the user's own settings win
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    run = TrialRun(
        uri,
        exp_id,
        parent_id,
        trial_id,
        name,
        cfg.flat(),
        tags={
            "contrastlab.method": cfg.method.name,
            THREADS_TAG: str(torch.get_num_threads()),
            # the code this run ran (an editable install changes under a running sweep)
            "contrastlab.source_sha256": source_digest(),
            "contrastlab.pid": str(os.getpid()),
            **tags,
        },
        spool=spool,
    )
    if run.created:
        run.log_text(cfg.to_yaml(), "config.yaml")
        from contrastlab.data.lineage import data_sources

        log_data_inputs(uri, run.run_id, data_sources(cfg.data))
    return run


def log_data_inputs(uri: str, run_id: str, sources: list) -> None:
    """Record the run's datasets (``data.lineage.data_sources``: source, digest, rows; training
    / evaluation) as MLflow dataset inputs; :mod:`contrastlab.data.lineage` says what the
    digest covers."""
    from mlflow.exceptions import MlflowException

    from contrastlab.data.lineage import mlflow_inputs

    datasets = mlflow_inputs(sources)
    for attempt in range(3):
        try:
            client(uri).log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as e:
            # Concurrent trials logging the same new dataset: the SQL store looks the dataset
            # up, then inserts it, so the slower insert breaks UNIQUE(experiment, name,
            # digest) and its transaction rolls back. The row exists now: the next attempt
            # only links it. (A sweep's trial FAILED on this once.)
            text = str(e)
            duplicate = "IntegrityError" in text or "unique constraint" in text.lower()
            if not duplicate or attempt == 2:
                raise


def data_digests(run: Any) -> dict[str, tuple[str, str]]:
    """``{context: (source, digest)}`` of the dataset inputs an MLflow run carries."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    out = {}
    for di in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in di.tags if t.key == MLFLOW_DATASET_CONTEXT), "")
        out[context] = (json.loads(di.dataset.source).get("uri", "?"), di.dataset.digest)
    return out


def _rows_before(run_dir: Path, epoch: int) -> list[dict[str, float]]:
    """The rows of the trainer's ``metrics.jsonl`` before ``epoch`` (epoch 0, the random-init
    evaluation, and after a resume the epochs the checkpoint holds)."""
    from contrastlab.rundir import read_metrics

    return [r for r in read_metrics(run_dir) if r.get("epoch", 0) < epoch]


def epoch_logger(run: TrialRun, epochs: int, run_dir: Path | None = None):
    """A training hook (``hook(epoch, metrics, checkpoint)``, see :data:`contrastlab.train.Hook`)
    that logs every epoch to ``run``, step = epoch.

    Hooks run after an epoch, so the first call also sends the rows of ``run_dir``'s
    ``metrics.jsonl`` before it that the run lacks: the random-init evaluation (step 0) and,
    when a run resumed into a new MLflow run, the epochs its checkpoint holds.

    It keeps the run's history (seeded from those rows) and, whenever
    :func:`contrastlab.evaluate.diagnose` finds something new, sets :data:`DIAGNOSIS_TAG` to
    every message said so far, one per line. At the last epoch it closes the run (pending
    metrics, the checkpoint, FINISHED; see :func:`close_run`) before returning: Tune stops a
    trial at its last report, so nothing after that is guaranteed to run.
    """
    from contrastlab.evaluate import grace_epochs, update_diagnoses

    history: list[dict[str, float]] = []
    said: list[dict[str, Any]] = []

    def hook(epoch: int, metrics: dict[str, float], ckpt: Path | None) -> None:
        if not history and run_dir is not None:
            earlier = _rows_before(run_dir, epoch)
            for row in earlier:
                # epochs the run holds (a reopened run) are not sent twice; epoch 0 carries no
                # loss, so it counts as held once any trained epoch is (it is sent first)
                if int(row.get("epoch", 0)) > run.logged_through:
                    run.log_epoch(int(row.get("epoch", 0)), row)
            history.extend(earlier)
        run.log_epoch(epoch, metrics)
        history.append(metrics)
        if update_diagnoses(history, said, epoch == epochs, grace_epochs(epochs)):
            run.set_tag(DIAGNOSIS_TAG, "\n".join(d["message"] for d in said))
        if epoch == epochs:
            close_run(run, ckpt)

    return hook


def close_run(run: TrialRun, ckpt: Path | None, wait_s: float | None = None) -> None:
    """Send what is pending, the final checkpoint and FINISHED. If the server stays down for
    ``wait_s`` (default :data:`OUTAGE_WAIT_S`), say exactly what is missing and let training
    end normally: a sweep's driver sends the spooled metrics and settles the run state once it
    can; for a hand run, the spool file lists what never reached MLflow."""
    deadline = time.monotonic() + (OUTAGE_WAIT_S if wait_s is None else wait_s)
    delay = 1.0
    while not run.flush() and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 15.0)
    if run.pending:
        print(
            f"contrastlab: MLflow unreachable: epochs {[e for e, _ in run.pending]} of run "
            f"{run.run_id} are not logged yet; they wait in {run.spool}",
            flush=True,
        )
        return
    try:
        if ckpt is not None:
            run.log_artifact(ckpt, "checkpoint")
        run.end("FINISHED")
    except Exception as e:  # the server went away between the flush and here
        print(f"contrastlab: MLflow: could not close run {run.run_id}: {e}", flush=True)


@contextlib.contextmanager
def failed_on_error(run: TrialRun | None):
    """Run the body; if it raises, end ``run`` FAILED with the exception as the reason."""
    try:
        yield
    except Exception as e:
        if run is not None:
            run.end("FAILED", reason=f"{type(e).__name__}: {e}")
        raise


def log_provenance_files(uri: str, run_id: str, prov: Mapping[str, Any]) -> None:
    """``provenance.json`` (all of :func:`provenance` but the diff) and, from a checkout with
    uncommitted changes, ``git_diff.patch``, as artifacts of ``run_id``."""
    import tempfile

    c = client(uri)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "provenance.json").write_text(
            json.dumps({k: v for k, v in prov.items() if k != "git_diff"}, indent=2)
        )
        c.log_artifact(run_id, str(Path(d) / "provenance.json"))
        if prov["git_diff"]:
            (Path(d) / "git_diff.patch").write_text(prov["git_diff"])
            c.log_artifact(run_id, str(Path(d) / "git_diff.patch"))


def open_train_run(
    tracking_uri: str | None,
    experiment: str | None,
    cfg: Any,
    run_dir: str | Path,
    resume: bool = False,
) -> TrialRun:
    """The MLflow run of a hand run (``contrastlab train --tracking-uri``): a run of its own,
    no parent, logged like a sweep trial (see :func:`open_run`) and tagged
    ``contrastlab.kind=train``, with provenance tags, ``provenance.json`` and the git diff.

    Args:
        tracking_uri: MLflow store (resolved as for sweeps, see :func:`resolve_tracking_uri`).
        experiment: MLflow experiment; default :data:`TRAIN_EXPERIMENT`
            (``contrastlab-train-<method>``).
        cfg: the run's config.
        run_dir: the run directory; :data:`TRAIN_RUN_FILE` there records the MLflow run.
        resume: the run continues from its checkpoint: it continues its MLflow run too (same
            store), without logging an epoch twice.
    """
    from contrastlab.config import ConfigError

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    run_dir = Path(run_dir)
    link = run_dir / TRAIN_RUN_FILE
    known = json.loads(link.read_text()) if resume and link.is_file() else None
    if known is not None and known["tracking_uri"] != uri:
        known = None  # another store: a new run there, with the epochs the checkpoint holds
    if known is not None:
        if experiment is not None and experiment != known["experiment"]:
            raise ConfigError(
                f"--experiment {experiment!r}: {run_dir} logs to MLflow run {known['run_id']} "
                f"in experiment {known['experiment']!r}; leave --experiment out to continue it"
            )
        experiment, trial_id = known["experiment"], known["trial_id"]
    else:
        experiment = experiment or TRAIN_EXPERIMENT.format(method=cfg.method.name)
        trial_id = f"train-{uuid.uuid4().hex[:12]}"
    exp_id = experiment_id(uri, experiment)
    prov = provenance()
    tags = {
        KIND_TAG: "train",
        "contrastlab.workers": "1",
        "contrastlab.run_dir": str(run_dir.resolve())[:5000],
        **provenance_tags(prov),
    }
    run = open_run(uri, exp_id, None, trial_id, run_dir.name, cfg, tags, run_dir / PENDING_FILE)
    if run.created:
        log_provenance_files(uri, run.run_id, prov)
    run_dir.mkdir(parents=True, exist_ok=True)
    link.write_text(
        json.dumps(
            {
                "tracking_uri": uri,
                "experiment": experiment,
                "run_id": run.run_id,
                "trial_id": trial_id,
            },
            indent=1,
        )
    )
    return run
