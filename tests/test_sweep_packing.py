"""Fractional GPUs: trials with ``resources.gpus_per_worker`` < 1 share one GPU.

Ray schedules GPUs as logical resources, so a local Ray told it has one GPU (``num_gpus=1``)
on this CPU machine packs trials exactly as a one-GPU box would; the trials then train on the
CPU, because torch sees no CUDA device. Two half-GPU trials run at the same time on GPU 0, in
two processes; two whole-GPU trials run one after the other, each in its own process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from contrastlab import tracking
from contrastlab.sweep.runner import run_sweep, smoke_space
from contrastlab.sweep.space import load_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_one_gpu():
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=True,  # the State API, which Train V2 needs (see conftest)
        dashboard_host="127.0.0.1",
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}},
    )
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(("gpus", "together"), [(0.5, True), (1, False)])
def test_fractional_gpu_trials_share_one_gpu(tmp_path, ray_one_gpu, gpus, together):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = smoke_space(load_space(ROOT / "search_spaces" / "simclr.yaml"), trials=2, epochs=1)
    space = space.with_overrides(resources={"gpus_per_worker": gpus}, concurrency=2)
    out = run_sweep(space, name=f"gpu-{gpus}", storage_path=tmp_path / "sweeps", tracking_uri=uri)
    assert [t["status"] for t in out.trials] == ["FINISHED", "FINISHED"]
    c = tracking.client(uri)
    parent = c.get_run(out.parent_run_id)
    runs = tracking.child_runs(uri, parent.info.experiment_id, out.parent_run_id)
    runs = sorted(runs, key=lambda r: r.info.start_time)
    assert [r.data.tags["contrastlab.gpu_ids"] for r in runs] == ["0", "0"]
    pids = {r.data.tags["contrastlab.pid"] for r in runs}
    order = [r.data.tags["contrastlab.trial_in_process"] for r in runs]
    if together:  # two trial processes, each holding half of GPU 0 at the same time
        assert len(pids) == 2 and order == ["1", "1"]
    else:  # the second trial waited for the GPU (a fresh process: reuse_actors is opt-in)
        assert len(pids) == 2 and order == ["1", "1"]
        assert runs[1].info.start_time >= runs[0].info.end_time
