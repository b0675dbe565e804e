"""Seeing runs: a local MLflow server and headless-Chromium views of its pages.

Used by the tests that start an MLflow server or render its UI, and by
``pipelines/screenshot.py`` (the images in docs/img/); a tool beside the package, not in it.
The server binds 127.0.0.1 only (an MLflow server has no authentication of its own; see
docs/security.md), and Chromium runs headless with every background network feature off, in
a fresh profile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
)


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(
    backend_uri: str,
    artifacts: str | Path,
    port: int | None = None,
    timeout_s: float = 90,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 for the ``with`` block; yields its URL.

    ``extra_args`` go to the command line (e.g. ``--app-name basic-auth``, ``--allowed-hosts``),
    ``env`` is added to the server's environment only (e.g. the auth app's admin password).
    """
    port = port or free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow) if mlflow.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *extra_args,
    ]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        try:
            _wait_healthy(url, proc, log, timeout_s)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)


def _wait_healthy(url: str, proc: subprocess.Popen, log, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise RuntimeError(
                f"mlflow server did not come up on {url}: {log.read().decode()[-2000:]}"
            )
        time.sleep(0.5)


def compare_url(server: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The MLflow UI's compare view of ``run_ids``."""
    runs = urllib.parse.quote(json.dumps(list(run_ids)))
    exps = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{server}/#/compare-runs?runs={runs}&experiments={exps}"


def _run_chromium(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise RuntimeError("Chromium not found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )


def render_dom(
    url: str, budget_ms: int = 20000, size: tuple[int, int] = (2400, 2400), timeout_s: float = 120
) -> str:
    """The page's DOM after its scripts ran for ``budget_ms`` of virtual time.

    The window is large because MLflow's tables render only the rows and columns in view.
    """
    args = [f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}"]
    out = _run_chromium([*args, "--dump-dom", url], timeout_s)
    return out.stdout.decode(errors="replace")


def screenshot(
    url: str,
    path: str | Path,
    size: tuple[int, int] = (1400, 1000),
    budget_ms: int = 20000,
    timeout_s: float = 120,
) -> Path:
    """A PNG of the page as rendered after ``budget_ms`` of virtual time."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _run_chromium(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={path}",
            url,
        ],
        timeout_s,
    )
    if not path.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot for {url}")
    return path


__all__ = ["chromium", "compare_url", "mlflow_server", "render_dom", "screenshot"]
