"""`--resume` after the sweep driver died with the local Ray it started (a new Ray session on
resume, so new Ray temp paths), and `train --resume` of a run directory moved elsewhere.

Each test asserts the outcome itself: the interrupted trial ends FINISHED, continued from a
checkpoint, with every epoch in MLflow exactly once, and equals an uninterrupted run of its
config bit for bit (CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from contrastlab import tracking
from contrastlab.sweep.reproduce import reproduce

EPOCHS = 10
TINY_BASE = {
    "data": {"dataset": "digits", "image_size": 16, "max_train_samples": 1024},
    "model": {"backbone": "convnet", "width": 8, "head_hidden_dim": 32, "proj_dim": 16},
    "augment": {"recipe": "digits"},
    "train": {"batch_size": 64, "device": "cpu", "precision": "fp32"},
    "eval": {"knn_k": 20},
}
COMMON = {
    "metric": "knn_top1",
    "mode": "max",
    "budget": {"epochs": EPOCHS},
    "concurrency": 1,
    "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
}


def _write_spec(tmp_path: Path, kind: str) -> Path:
    """Three runs of ``EPOCHS`` epochs, one at a time, none stopped early."""
    if kind == "sweep":
        spec = {
            "method": "simclr",
            "base": TINY_BASE,
            "params": {"method.temperature": {"dist": "loguniform", "low": 0.1, "high": 0.5}},
            "scheduler": {"name": "fifo"},
            "trials": 3,
            "seed": 0,
            **COMMON,
        }
    else:
        spec = {
            "method": "simclr",
            "base": TINY_BASE,
            "factors": {"method.temperature": [0.2, 0.5, 0.3]},
            "seeds": 1,
            **COMMON,
        }
    path = tmp_path / f"kill_{kind}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _children(uri: str, experiment: str, name: str) -> list:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    parent = tracking.find_parent(uri, exp.experiment_id, name)
    return [] if parent is None else tracking.child_runs(uri, exp.experiment_id, parent)


def _epochs_logged(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in tracking.client(uri).get_metric_history(run_id, "loss"))


def kill_mid_trial_and_resume(args: list[str], env: dict, uri: str, experiment: str, tmp_path):
    """Run the driver ``args``, SIGKILL its process group halfway through the second of three
    runs, run ``args --resume``, and check the outcome of every run."""
    driver = subprocess.Popen(
        args,
        env=env,
        cwd=tmp_path,
        start_new_session=True,  # the driver and a Ray it starts: one process group
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    victim = None
    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None:
        runs = _children(uri, experiment, "killtest")
        finished = [r for r in runs if r.info.status == "FINISHED"]
        running = [r for r in runs if r.info.status == "RUNNING"]
        # the second trial, halfway: Tune has saved some of its checkpoints by then
        if finished and running and len(_epochs_logged(uri, running[0].info.run_id)) >= 5:
            victim = running[0].info.run_id
            break
        time.sleep(0.3)
    assert driver.poll() is None and victim, "the sweep ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = {r.info.run_id: r for r in _children(uri, experiment, "killtest")}
    (first,) = [k for k, r in before.items() if r.info.status == "FINISHED"]
    first_end = before[first].info.end_time
    logged_before = _epochs_logged(uri, victim)
    assert len(logged_before) < EPOCHS

    resumed = subprocess.run(
        [*args, "--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    c = tracking.client(uri)
    after = {r.info.run_id: r for r in _children(uri, experiment, "killtest")}
    assert len(after) == 3  # one child run per trial, none duplicated
    assert {k: r.info.status for k, r in after.items()} == dict.fromkeys(after, "FINISHED")
    from mlflow.entities import ViewType

    exp_id = c.get_experiment_by_name(experiment).experiment_id
    assert not c.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY)  # no orphan
    # the interrupted trial continued from a checkpoint, not from scratch
    start = int(after[victim].data.tags["contrastlab.resumed_from_epoch"])
    assert 1 <= start <= len(logged_before), (start, logged_before)
    assert f"continues from its epoch {start} checkpoint" in resumed.stdout + resumed.stderr
    assert "contrastlab.retrained_epochs_differ" not in after[victim].data.tags
    # every epoch exactly once, the random-init evaluation as step 0
    assert _epochs_logged(uri, victim) == list(range(1, EPOCHS + 1))
    knn_steps = sorted(m.step for m in c.get_metric_history(victim, "knn_top1"))
    assert knn_steps == list(range(0, EPOCHS + 1))
    # run directories live in the sweep's storage, not in a Ray session's temp folder
    ckpt_dirs = sorted((tmp_path / "sweeps").glob("killtest/*/run/checkpoints"))
    assert len(ckpt_dirs) == 3
    for d in ckpt_dirs:
        assert sorted(p.name for p in d.glob("*.pt"))[-1] == f"epoch_{EPOCHS:04d}.pt"
    # the finished trial was not run again
    assert after[first].info.end_time == first_end
    assert _epochs_logged(uri, first) == list(range(1, EPOCHS + 1))
    # the interrupted-and-resumed trial equals an uninterrupted run of its config, bit for bit
    rep = reproduce(
        run_id=victim, tracking_uri=uri, output_dir=tmp_path / "ref", log_to_mlflow=False
    )
    assert rep.ok and rep.exact, rep.text


def driver_args(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    """The `contrastlab sweep|ablate` command of the kill tests, and its MLflow experiment."""
    spec = _write_spec(tmp_path, kind)
    flag = "--space" if kind == "sweep" else "--spec"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "contrastlab", kind, flag, str(spec), "--name", "killtest"]
    args += ["--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", uri]
    return args, f"contrastlab-{spec.stem}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sweep", "ablate"])
def test_resume_after_the_driver_died_with_its_local_ray(tmp_path, kind):
    """The issue's case: `contrastlab sweep` (or `ablate`) started its own Ray; SIGKILL takes
    the driver and that Ray down mid-trial; `--resume` runs in a new Ray session."""
    args, experiment = driver_args(tmp_path, kind)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    kill_mid_trial_and_resume(args, env, args[-1], experiment, tmp_path)


def test_train_resume_of_a_moved_run_directory(tmp_path, tiny):
    """A run interrupted after epoch 2, moved to another folder, resumed there: the result is
    the uninterrupted run's, and nothing is written back to the old location."""
    from contrastlab.rundir import RunPlace, load_run_config
    from contrastlab.train import Trainer, train

    cfg = tiny(train={"epochs": 4})
    ref = train(cfg, RunPlace(tmp_path / "ref"))

    class StopError(Exception):
        pass

    def stop_after_two(epoch, metrics, ckpt):
        if epoch == 2:
            raise StopError

    old = tmp_path / "old" / "r"
    with pytest.raises(StopError):
        Trainer(cfg, RunPlace(old), hooks=[stop_after_two]).fit()
    assert sorted(p.name for p in (old / "checkpoints").glob("*.pt"))[-1] == "epoch_0002.pt"
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    shutil.move(old, moved)

    # the resumed process computes with as many threads as the reference did (a float sum
    # split over another thread count rounds differently), whatever OMP_NUM_THREADS says
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(
        [sys.executable, "-m", "contrastlab", "train", "--resume", str(moved)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **threads},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["run_dir"] == str(moved)
    assert not old.exists()  # nothing went back to where the run used to live
    resumed = [json.loads(x) for x in (moved / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in resumed] == [0, 1, 2, 3, 4]
    for mine, theirs in zip(resumed, ref.history, strict=True):
        for key in ("loss", "knn_top1"):
            if key in theirs:
                assert mine[key] == theirs[key], (mine["epoch"], key)
    assert load_run_config(moved) == cfg
