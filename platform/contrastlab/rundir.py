"""A run directory: where one training run writes its files, and the reading and writing of them.

A run directory holds::

    config.yaml          the resolved config (every default filled in)
    protocol.json        how the evaluation numbers were produced
    metrics.jsonl        one JSON line per epoch (epoch 0 = before training, when measured)
    checkpoints/epoch_NNNN.pt   model, optimizer, RNG states, history (weights_only-loadable)
    summary.json         final metrics, written when training finishes
    mlflow_run.json      the MLflow run it logs to (``contrastlab train --tracking-uri``)

Where a run is written (and whether it shows progress bars) does not change its results, so
it is not part of the :class:`~contrastlab.config.Config`: the caller names it with a
:class:`RunPlace`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from contrastlab.config import Config, ConfigError, saved_config

DEFAULT_OUTPUT_DIR = "runs"
"""Parent folder of run directories named by time stamp (``contrastlab train --output-dir``)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


@dataclass(frozen=True)
class RunPlace:
    """Where a run writes its files, and whether it shows progress.

    Args:
        dir: the run directory (created when training starts).
        progress: progress bars and one line per epoch on stderr (rank 0 only); off by
            default, on for ``contrastlab train`` unless ``--no-progress``.
    """

    dir: Path
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))


def make_run_dir(
    cfg: Config, output_dir: str | Path = DEFAULT_OUTPUT_DIR, name: str | None = None
) -> Path:
    """``output_dir/name``; without ``name``, a new one from the time, method and dataset."""
    name = name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.name}-{cfg.data.dataset}"
    return Path(output_dir) / name


def load_run_config(run_dir: str | Path) -> Config:
    """The config a run directory was trained with (see
    :func:`~contrastlab.config.saved_config`: run directories of older versions load too)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} not found (is {run_dir} a run directory?)")
    return saved_config(path.read_text())


def write_run_files(run_dir: Path, cfg: Config, protocol: dict[str, Any]) -> None:
    """``config.yaml`` and ``protocol.json`` (creating the directory)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "protocol.json").write_text(json.dumps(protocol, indent=2))


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """``metrics.jsonl`` holding exactly ``history``, one line per epoch."""
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def append_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    """One epoch's line at the end of ``metrics.jsonl``."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``metrics.jsonl`` (none when there is no such file)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


# --------------------------------------------------------------------------- checkpoints


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    """Where the checkpoint of ``epoch`` goes; :func:`checkpoint_epoch` reads the name back."""
    return run_dir / "checkpoints" / f"epoch_{epoch:04d}.pt"


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint file holds, from its name (``epoch_NNNN.pt``)."""
    return int(Path(path).stem.split("_")[1])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash or a full disk mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        # serialise in memory first: torch's zip writer turns a full disk into an opaque
        # "unexpected pos" error, a plain write gives the OS's own (ENOSPC, EDQUOT, ...)
        buf = io.BytesIO()
        torch.save(state, buf)
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # disk full, permissions, unpicklable state: all fatal, all named
        tmp.unlink(missing_ok=True)
        free = ""
        if isinstance(e, OSError):
            with contextlib.suppress(OSError):
                free = f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there)"
        raise CheckpointError(f"could not write checkpoint {path}: {e}{free}") from e


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code from pickles)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a contrastlab checkpoint: {e}"
        ) from e


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("epoch_*.pt"))
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest epoch checkpoints."""
    for old in sorted((run_dir / "checkpoints").glob("epoch_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
