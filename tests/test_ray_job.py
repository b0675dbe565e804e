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
    c = tracking.client(uri)
    for run in children:  # each run's end state is the true one, not merely "not RUNNING"
        epochs = len(c.get_metric_history(run.info.run_id, "loss"))
        if run.info.status == "FINISHED":
            assert epochs == 2  # the smoke budget
        else:
            assert run.info.status == "KILLED" and epochs < 2, (run.info.status, epochs)
            assert "stopped early" in run.data.tags["contrastlab.end_reason"]
    assert any(r.info.status == "FINISHED" for r in children)
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


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(ray_head, tmp_path):
    """The driver joined a head that stays up (same Ray session, same paths) and is SIGKILLed
    halfway through its second trial; --resume finishes it from its checkpoint and runs the
    third. The interrupted trial's end state, epoch history and final metrics are checked
    (tests/test_resume.py has the case where the driver's own Ray dies with it)."""
    from tests.test_resume import driver_args, kill_mid_trial_and_resume

    args, experiment = driver_args(tmp_path, "sweep")
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["gcs"]}  # join the running head
    kill_mid_trial_and_resume(args, env, args[-1], experiment, tmp_path)
