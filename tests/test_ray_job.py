"""End to end on a real local Ray head with token auth: `ray job submit` runs the smoke sweep.

The head is started by this module (`ray start --head --block` in its own process group, the
dashboard bound to 127.0.0.1) and only those processes are stopped afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from contrastlab import tracking

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("head")
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    # its own temp dir: the 'current cluster' file goes there, not to /tmp/ray, so a later
    # plain ray.init() never tries to join this head once it is gone (short path: sockets)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "2",
            "--port",
            str(gcs),
            "--temp-dir",
            temp_dir,
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:  # the dashboard answers once the head is up
        try:
            urllib.request.urlopen(address + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # answered (401 without a token): up
        except OSError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("ray head did not come up in 120 s")
    yield {
        "address": address,
        "gcs": f"127.0.0.1:{gcs}",
        "env": env,
        "token": token_file.read_text(),
    }
    # only the processes this fixture started (its own process group); `ray start --block`
    # does not act on SIGTERM promptly, so give it 5 s and then kill the group
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_jobs_api_refuses_requests_without_the_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(ray_head["address"] + "/api/jobs/", timeout=10)
    assert e.value.code in (401, 403)
    req = urllib.request.Request(
        ray_head["address"] + "/api/jobs/", headers={"Authorization": f"Bearer {ray_head['token']}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


@pytest.mark.slow
def test_ray_job_submit_smoke_sweep(ray_head, tmp_path):
    db = tmp_path / "mlflow.db"
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        ray_head["address"],
        "--working-dir",
        str(ROOT),
        "--",
        sys.executable,
        "pipelines/sweep.py",
        "--space",
        "search_spaces/simclr.yaml",
        "--smoke-test",
        "--name",
        "jobsmoke",
        "--storage-path",
        str(tmp_path / "sweeps"),
        "--tracking-uri",
        f"sqlite:///{db}",
    ]
    out = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "sweep jobsmoke: 3 trials" in out.stdout
    uri = f"sqlite:///{db}"
    exp = tracking.client(uri).get_experiment_by_name("contrastlab-simclr")
    parent = tracking.find_parent(uri, exp.experiment_id, "jobsmoke")
    children = tracking.child_runs(uri, exp.experiment_id, parent)
    assert len(children) == 3
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    assert tracking.client(uri).get_run(parent).info.status == "FINISHED"
    listed = subprocess.run(
        [RAY, "job", "list", "--address", ray_head["address"]],
        env=ray_head["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "SUCCEEDED" in listed.stdout
    assert json.dumps(ray_head["token"])[1:-1] not in listed.stdout  # no secret in job list


def _statuses(uri: str, name: str) -> dict[str, str]:
    exp = tracking.client(uri).get_experiment_by_name("contrastlab-simclr")
    if exp is None:
        return {}
    parent = tracking.find_parent(uri, exp.experiment_id, name)
    if parent is None:
        return {}
    return {
        r.info.run_id: r.info.status for r in tracking.child_runs(uri, exp.experiment_id, parent)
    }


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(ray_head, tmp_path):
    """Kill the sweep driver after its first trial finished; --resume finishes the rest."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gcs = ray_head["gcs"]  # the driver joins the running head through RAY_ADDRESS
    env = {**ray_head["env"], "RAY_ADDRESS": gcs}
    args = [
        sys.executable,
        str(ROOT / "pipelines" / "sweep.py"),
        "--space",
        str(ROOT / "search_spaces" / "simclr.yaml"),
        "--smoke-test",
        "--name",
        "resumable",
        "--trials",
        "4",
        "--concurrency",
        "1",
        "--storage-path",
        str(tmp_path / "sweeps"),
        "--tracking-uri",
        uri,
    ]
    driver = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if "FINISHED" in _statuses(uri, "resumable").values():
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = _statuses(uri, "resumable")
    finished_before = {k for k, v in before.items() if v == "FINISHED"}
    assert finished_before and len(before) < 4
    c = tracking.client(uri)
    end_times = {k: c.get_run(k).info.end_time for k in finished_before}

    resumed = subprocess.run(
        [*args, "--resume"], env=env, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _statuses(uri, "resumable")
    assert len(after) == 4  # exactly one child run per trial, none duplicated
    assert set(after.values()) <= {"FINISHED", "KILLED"}  # none left RUNNING
    # a trial that started just before the kill, before Tune saved it, is an orphan the
    # resumed sweep replaced: its run is KILLED, says why, and sits in MLflow's deleted runs
    from mlflow.entities import ViewType

    exp_id = c.get_experiment_by_name("contrastlab-simclr").experiment_id
    for run in c.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY):
        assert run.info.status == "KILLED"
        assert run.data.tags["contrastlab.end_reason"].startswith("orphan: trial")
        assert f"MLflow run {run.info.run_id}" in resumed.stdout
    for k in finished_before:  # finished trials were not run again
        assert after[k] == "FINISHED" and c.get_run(k).info.end_time == end_times[k]
        hist = c.get_metric_history(k, "loss")
        assert sorted(m.step for m in hist) == [1, 2]
