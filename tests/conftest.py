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


class S3Store:
    """A real S3-compatible server (moto's) on 127.0.0.1, with the environment pointing at it."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def upload(self, local_dir, uri: str) -> str:
        """Copy the tree ``local_dir`` to ``uri`` (``s3://bucket/prefix``); returns ``uri``."""
        import pyarrow.fs as pafs

        pafs.copy_files(
            str(local_dir),
            uri[len("s3://") :],
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.filesystem(),
        )
        return uri

    def require_auth(self, on: bool) -> None:
        """Make the server check every request's access key against its (empty) IAM users."""
        import urllib.request

        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0" if on else b"inf",
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()


@pytest.fixture(scope="module")
def s3_store():
    """Module-wide moto S3 server; AWS_* variables point this process's pyarrow at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            yield S3Store(env["AWS_ENDPOINT_URL"])
    finally:
        server.stop()
