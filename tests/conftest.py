"""Shared fixtures: tiny, fast configs on the built-in digits data."""

from __future__ import annotations

import pytest
import torch

from contrastlab.config import make_config

torch.set_num_threads(2)


def tiny_config(name: str = "simclr", **sections):
    """A config that trains in well under a second per epoch on 2 CPU cores."""
    raw = {
        "method": {"name": name},
        "model": {"backbone": "convnet", "width": 8, "head_hidden_dim": 32, "proj_dim": 16},
        "data": {"dataset": "digits", "image_size": 16, "max_train_samples": 256},
        "train": {"epochs": 1, "batch_size": 64, "device": "cpu"},
        "eval": {"knn_k": 20, "num_patches": 4},
    }
    if name == "moco":
        raw["method"]["queue_size"] = 256
    if name == "emp_ssl":
        raw["method"]["num_patches"] = 4
    if name == "instdisc":
        raw["method"]["nce_k"] = 64  # < the 256 training images of the tiny config
    if name == "cmc":  # digits are gray: Lab's ab view would be constant
        raw["method"]["colorspace"] = "rgb"
    if name == "cpc":  # a narrow context network: the default one dwarfs the width-8 encoder
        raw["method"].update(context_layers=2, context_hidden_dim=32)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return make_config(raw)


def init_gloo(rank: int, world: int, tmp) -> None:
    """Join a ``world``-process gloo group through a rendezvous file in ``tmp`` (one thread
    per process: the workers share the CPU)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world
    )
    torch.set_num_threads(1)


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray for one test module (2 CPUs, dashboard on localhost)."""
    import ray

    ray.init(
        address="local",  # a new local instance, never a cluster left by something else
        num_cpus=2,
        # the dashboard hosts the State API, which Train V2 needs to release a finished
        # trial's placement group (without it the next trainer trial waits forever)
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}},
    )
    yield
    ray.shutdown()
