"""Shared fixtures: tiny, fast configs on the built-in digits data."""

from __future__ import annotations

import pytest
import torch

from contrastlab.config import make_config, tiny_raw

torch.set_num_threads(2)


def tiny_config(name: str = "simclr", **sections):
    """A config that trains in well under a second per epoch on 2 CPU cores (the method's tiny
    setting, ``contrastlab.config.tiny_raw``), with ``sections`` merged over it."""
    raw = tiny_raw(name)
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
