"""The training loop. It runs the same way locally, inside a Ray Train worker and as a Tune trial.

Ray stays outside: the caller passes ``hooks``, called after every epoch with the metrics and
the path of the checkpoint just written, which is where a Ray integration reports to Tune.
What a run writes, and where, is :mod:`contrastlab.rundir`'s.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from contrastlab import evaluate
from contrastlab.augment import BatchAugment
from contrastlab.config import Config, ConfigError, saved_config
from contrastlab.data import DatasetSplits, load_dataset, stream
from contrastlab.data.load import open_source, with_eval_set
from contrastlab.distributed import (
    all_reduce_mean,
    average_gradients,
    broadcast_module,
    rank,
    world_size,
)
from contrastlab.methods import Method, build_method
from contrastlab.optim import build_optimizer, lr_at
from contrastlab.rundir import (
    CheckpointError,
    RunPlace,
    append_metrics,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    make_run_dir,
    prune_checkpoints,
    save_checkpoint,
    write_metrics,
    write_run_files,
    write_summary,
)
from contrastlab.tracking import source_digest

Hook = Callable[[int, dict[str, float], Path | None], None]
"""``hook(epoch, metrics, checkpoint_path)``, called after each epoch on every worker."""

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(uint8 [b, 3, S, S] images, int64 [b] labels, int64 [b] row index)`` on the device."""


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, float]]
    final: dict[str, float]
    method: Method = field(repr=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'"
        )
    return torch.device(name)


def _seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        # warn_only: a few CUDA kernels have no deterministic variant; CPU runs repeat exactly
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        # set both ways: a process that runs several trials (Tune's reuse_actors) must not
        # carry one run's setting into the next
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


# --------------------------------------------------------------------------- the loop


class Trainer:
    """Builds everything a run needs from a :class:`Config` and trains it.

    Args:
        cfg: the run config.
        place: where the run writes its files and whether it shows progress (default: a new
            time-stamped directory under ``runs/``, no progress output).
        hooks: called after each epoch (see :data:`Hook`).
        data: pre-loaded dataset splits (default: loaded from ``cfg.data``).
    """

    def __init__(
        self,
        cfg: Config,
        place: RunPlace | None = None,
        hooks: Sequence[Hook] = (),
        data: DatasetSplits | None = None,
    ) -> None:
        self.cfg = cfg
        self.place = place if place is not None else RunPlace(make_run_dir(cfg))
        self.hooks = list(hooks)
        self.device = resolve_device(cfg.train.device)
        self.rank, self.world = rank(), world_size()
        self.is_main = self.rank == 0
        t = cfg.train
        _seed_everything(t.seed, t.deterministic)

        # Batch order (CPU) and augmentation (device) generators are re-seeded at the start of
        # every epoch from (seed, epoch, rank), so a run resumed at an epoch boundary draws
        # exactly what the uninterrupted run would have, on every worker.
        self.order_gen = torch.Generator()
        self.aug_gen = torch.Generator(device=self.device)
        store = self.device if cfg.data.on_device else torch.device("cpu")
        # where the training batches come from: `batches(epoch, steps)` yields this worker's
        # (uint8 images, labels, row index) on the device, from memory or streamed
        # a root that may stream is listed once: for auto's size, the plan and the monitors
        self.source, scanned = ("memory", None) if data is not None else open_source(cfg.data)
        self.batches: Callable[[int, int], Iterator[Batch]]
        if self.source == "stream":
            plan = stream.plan(cfg.data, scanned)
            data = with_eval_set(cfg.data, stream.monitor_splits(cfg.data, cfg.eval, scanned))
            self.stream = stream.StreamBatches(
                plan, cfg.data, t.seed, t.batch_size, self.rank, self.world, self.device
            )
            self.batches = self.stream.epoch
            n = len(plan)
        else:
            data = data if data is not None else load_dataset(cfg.data)
            self.train_set = data.train.to(store)
            self.batches = self._memory_batches
            n = len(self.train_set)
        if t.batch_size > n:
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) is larger than the training set "
                f"({n} images of {cfg.data.dataset}); lower it"
            )
        if t.batch_size % self.world:
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) must be divisible by the number of "
                f"workers ({self.world}): it is the global batch, split evenly"
            )
        self.local_batch = t.batch_size // self.world
        self.steps_per_epoch = n // t.batch_size  # drop_last: every step has a full batch
        self.total_steps = self.steps_per_epoch * t.epochs

        self.augment = BatchAugment(
            cfg.augment, cfg.data.image_size, data.train.mean, data.train.std
        )
        self.method = build_method(cfg, n).to(self.device)
        broadcast_module(self.method)  # every worker starts from rank 0's weights
        self.channels_last = t.channels_last
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if t.compile:
            self._compile_backbone()
        self.optimizer = build_optimizer(self.method, cfg.optim, self.device)
        self.autocast_dtype = torch.bfloat16 if t.precision == "bf16" else None
        self.monitor = evaluate.Monitor(
            self.method.backbone,
            self.augment,
            data,
            cfg.eval,
            self.device,
            seed=t.seed,
            store=store,
            autocast_dtype=self.autocast_dtype,
            channels_last=self.channels_last,
        )

        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- setup pieces

    def _compile_backbone(self) -> None:
        """torch.compile the backbone; fall back to eager (with a warning) if it fails."""
        bb = self.method.backbone
        try:
            bb.compile(backend=self.cfg.train.compile_backend)
            s = self.cfg.data.image_size
            with torch.no_grad():  # compile happens lazily: force it now, on a tiny batch
                bb.eval()
                bb(torch.zeros(2, 3, s, s, device=self.device))
                bb.train()
            self.compiled = True
        except Exception as e:  # any backend/compiler failure: training must go on
            bb._compiled_call_impl = None  # back to eager
            bb.train()
            self.compiled = False
            warnings.warn(f"torch.compile failed, continuing uncompiled: {e}", stacklevel=2)

    def views(self, images: torch.Tensor) -> torch.Tensor:
        """The augmented views a training step draws from ``images`` (``uint8 [B, 3, S, S]`` on
        the training device): ``[V, B, 3, S, S]`` float, V the method's ``n_views``, from the
        epoch's augmentation generator, channels_last when training is."""
        views = self.augment(images, self.method.n_views, self.aug_gen)  # [V, B, 3, S, S]
        if self.channels_last:
            V, B = views.shape[:2]
            flat = views.flatten(0, 1).contiguous(memory_format=torch.channels_last)
            views = flat.view(V, B, *flat.shape[1:])
        return views

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "contrastlab-checkpoint-v1",
            "config_yaml": self.cfg.to_yaml(),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history_json": json.dumps(self.history),
            # which code wrote it: named when a later version cannot load its model state
            "source_sha256": source_digest(),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        if state.get("format") != "contrastlab-checkpoint-v1":
            raise CheckpointError(f"{source}: not a contrastlab checkpoint (no format tag)")
        # the whole config must match; where the run lives is no part of it, so a resumed
        # sweep's new Ray session or a run directory moved elsewhere resumes
        saved = saved_config(state["config_yaml"]).flat()
        here = self.cfg.flat()
        if saved != here:
            diff = sorted(k for k in saved.keys() | here.keys() if saved.get(k) != here.get(k))
            raise CheckpointError(f"{source} was written by a different config; differs in {diff}")
        self._load_model_state(state, source)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = json.loads(state["history_json"])

    def _load_model_state(self, state: dict[str, Any], source: str) -> None:
        """The method's weights and buffers; a checkpoint of another model structure (from
        another code version with the same config) is a CheckpointError that says so."""
        saved = state["model"]
        here = self.method.state_dict()
        missing = sorted(set(here) - set(saved))
        unexpected = sorted(set(saved) - set(here))
        shapes = sorted(
            k
            for k in set(here) & set(saved)
            if isinstance(saved[k], torch.Tensor) and saved[k].shape != here[k].shape
        )
        if missing or unexpected or shapes:

            def few(keys: list[str]) -> str:
                return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

            parts = [
                f"{what} {few(keys)}"
                for what, keys in (
                    ("lacks", missing),
                    ("has extra", unexpected),
                    ("has other shapes for", shapes),
                )
                if keys
            ]
            written = state.get("source_sha256", "a version older than source stamps")
            raise CheckpointError(
                f"{source}: its model state does not fit this code's "
                f"{self.cfg.method.name!r} model although the config is the same: it "
                f"{'; it '.join(parts)}. It was written by contrastlab source {written}, this is "
                f"{source_digest()}: the model's structure changed between the two (e.g. "
                "MoCo checkpoints from before shuffle-BN lack 'shuffler._extra_state'). Resume "
                "it with the code that wrote it, or start a new run (another run directory)"
            )
        self.method.load_state_dict(saved)

    def resume(self) -> bool:
        """Load the newest checkpoint in the run directory; False if there is none."""
        ckpt = latest_checkpoint(self.place.dir)
        if ckpt is None:
            return False
        self.load_state_dict(load_checkpoint(ckpt, self.device), str(ckpt))
        return True

    # ----------------------------------------------------------------- the loop

    def _log_epoch(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        if self.is_main:
            append_metrics(self.place.dir, metrics)

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training set; returns the epoch's mean metrics."""
        cfg, t = self.cfg, self.cfg.train
        self.method.train()
        self.order_gen.manual_seed(_stream_seed(t.seed, self.epoch, 0, 0))  # same on all ranks
        self.aug_gen.manual_seed(_stream_seed(t.seed, self.epoch, 1, self.rank))
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{t.epochs}",
            disable=not (self.place.progress and self.is_main),
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        steps = 0
        for i, (images, labels, idx) in enumerate(self.batches(self.epoch, self.steps_per_epoch)):
            steps = i + 1
            lr = lr_at(self.step, self.total_steps, self.steps_per_epoch, cfg.optim)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            metrics = self.train_step(images, labels, idx)
            # metrics stay on the device; the host reads them once per log interval
            for k, v in metrics.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            if steps % t.log_every == 0 or steps == self.steps_per_epoch:
                running = (sums["loss"] / (i + 1)).item()  # the one host sync per interval
                self._guard(running, i + 1)
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.3g}")
            bar.update(1)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        out = {k: all_reduce_mean(v / steps).item() for k, v in sums.items()}
        self._guard(out["loss"], steps)
        views_per_epoch = steps * t.batch_size * self.method.n_views
        out.update(lr=lr, epoch_time_s=elapsed, views_per_s=views_per_epoch / elapsed)
        # cumulative over the run, continued from the checkpoint's history on resume
        spent = next((h for h in reversed(self.history) if "train_seconds" in h), {})
        out["train_seconds"] = spent.get("train_seconds", 0.0) + elapsed
        out["views_seen"] = spent.get("views_seen", 0.0) + float(views_per_epoch)
        if self.source == "stream" and self.cfg.data.decode_errors == "skip":
            out["decode_skipped"] = float(self.stream.skipped)
        return out

    def _memory_batches(self, epoch: int, steps: int) -> Iterator[Batch]:
        """The in-memory batch source: this worker's slice of each global batch of a random
        permutation from the epoch's order generator (seeded by :meth:`train_epoch`)."""
        t = self.cfg.train
        # moved once per epoch to where the data lives: no per-step index copies
        perm = torch.randperm(len(self.train_set), generator=self.order_gen)
        perm = perm.to(self.train_set.images.device)
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for i in range(steps):
            # the global batch is shared out: this worker takes its contiguous slice
            idx = perm[i * t.batch_size : (i + 1) * t.batch_size][lo:hi]
            images = self.train_set.images[idx].to(self.device, non_blocking=True)
            labels = self.train_set.labels[idx].to(self.device)
            yield images, labels, idx.to(self.device)

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch: augmentation, forward, loss, backward, step.

        This is the body of :meth:`train_epoch`'s loop (and what ``pipelines/bench.py``
        times). The learning rate is whatever the optimizer's groups hold: the epoch loop sets
        it before each step.

        Args:
            images: ``uint8 [B, 3, S, S]`` on the training device (this worker's slice).
            labels: ``int64 [B]`` (-1 where unknown).
            idx: ``int64 [B]`` dataset rows of the images.

        Returns:
            The method's metrics (detached scalar tensors, on the device: no host sync).
        """
        return self.model_step(self.views(images), labels, idx)

    def model_step(
        self, views: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """:meth:`train_step` on already augmented ``views`` ``[V, B, 3, S, S]``: forward
        (under autocast when ``train.precision`` says so), loss, backward, gradient averaging
        across workers, clipping, optimizer step, the method's end-of-step update."""
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            loss, metrics = self.method.training_step(views, labels, idx)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.method)
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.method.on_step_end()
        self.step += 1
        return metrics

    def _guard(self, loss: float, step: int) -> None:
        """Stop at once on a NaN/inf loss, or one above ``train.max_loss``."""
        t, name = self.cfg.train, self.cfg.method.name
        where = f"epoch {self.epoch + 1}, step {step}/{self.steps_per_epoch} (method {name})"
        if not math.isfinite(loss):
            raise DivergenceError(
                f"loss is {loss} at {where}; try a higher temperature or a lower optim.lr"
            )
        if t.max_loss is not None and loss > t.max_loss:
            raise DivergenceError(
                f"loss is {loss:.4g} > train.max_loss={t.max_loss:g} at {where}; "
                "the run is aborted as diverging"
            )

    def fit(self, resume: bool = False) -> TrainResult:
        """Train for ``train.epochs`` epochs (continuing from a checkpoint if ``resume``)."""
        cfg, t, run_dir = self.cfg, self.cfg.train, self.place.dir
        resumed = self.resume() if resume else False
        if resumed and self.is_main:
            self.monitor.recall_diagnoses(self.history, t.epochs)  # printed by that attempt
        if self.is_main:
            write_run_files(run_dir, cfg, self.monitor.protocol())
            # the file holds exactly the checkpoint's history: epochs trained after the last
            # checkpoint by an interrupted attempt are trained again, not listed twice
            write_metrics(run_dir, self.history if resumed else [])
            if self.monitor.notice:
                self._say(self.monitor.notice, always=True)
        init = self.monitor.measure(0, t.epochs) if not resumed and self.is_main else {}
        if init:
            self._log_epoch({"epoch": 0, **init})
            self._say(f"epoch 0 (random init): {_monitor_text(init)}")
        while self.epoch < t.epochs:
            metrics: dict[str, float] = {"epoch": self.epoch + 1}
            metrics.update(self.train_epoch())
            self.epoch += 1
            # evaluation runs on rank 0 only; it needs no collective, so the others go on
            if self.is_main:
                metrics.update(self.monitor.measure(self.epoch, t.epochs))
            self._log_epoch(metrics)
            ckpt = None
            if self.is_main and (self.epoch % t.checkpoint_every == 0 or self.epoch == t.epochs):
                ckpt = checkpoint_path(run_dir, self.epoch)
                save_checkpoint(ckpt, self.state_dict())
                prune_checkpoints(run_dir, t.keep_checkpoints)
            self._say(_epoch_line(metrics, t.epochs))
            if self.is_main:
                self.monitor.report_diagnoses(self.history, t.epochs, self.place.progress)
            for hook in self.hooks:
                hook(self.epoch, metrics, ckpt)
        final = dict(self.history[-1]) if self.history else {}
        knn = [h["knn_top1"] for h in self.history if "knn_top1" in h and h["epoch"] > 0]
        if knn:
            final["best_knn_top1"] = max(knn)
        if self.history and self.history[0]["epoch"] == 0 and "knn_top1" in self.history[0]:
            final["init_knn_top1"] = self.history[0]["knn_top1"]
        if self.is_main:
            summary = {
                "final": final,
                "protocol": self.monitor.protocol(),
                "diagnosis": self.monitor.diagnoses,
            }
            write_summary(run_dir, summary)
        return TrainResult(run_dir, self.history, final, self.method)

    def _say(self, text: str, always: bool = False) -> None:
        """Print ``text`` on the main worker: through tqdm with progress output, else only
        when ``always`` (then as a plain stderr line)."""
        if not self.is_main:
            return
        if self.place.progress:
            tqdm.write(text, file=sys.stderr)
        elif always:
            print(f"contrastlab: {text}", file=sys.stderr)


def _stream_seed(seed: int, epoch: int, stream: int, worker: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, random stream, worker)."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + stream * 10_007 + worker) % (2**63)


def _monitor_text(m: dict[str, float]) -> str:
    """The monitors of one epoch's metrics, as a console line's part."""
    parts = []
    if "knn_top1" in m:
        parts.append(f"knn_top1 {m['knn_top1']:.2f}%")
    for key, fmt in (("rankme", ".1f"), ("alignment", ".3f"), ("uniformity", ".3f")):
        if key in m:
            parts.append(f"{key} {m[key]:{fmt}}")
    if "nuisance_r2" in m:
        parts.append(f"nuisance_r2 {m['nuisance_r2']:.2f}")
    return " | ".join(parts)


def _epoch_line(m: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {int(m['epoch'])}/{epochs}", f"loss {m['loss']:.4f}"]
    if "knn_top1" in m:
        parts.append(_monitor_text(m))
    if "knn_full_top1" in m:
        parts.append(f"knn_full_top1 {m['knn_full_top1']:.2f}% (all images)")
    if "probe_top1" in m:
        parts.append(f"probe_top1 {m['probe_top1']:.2f}%")
    parts.append(f"{m['views_per_s']:.0f} views/s")
    parts.append(f"{m['epoch_time_s']:.1f}s")
    return " | ".join(parts)


def train(
    cfg: Config,
    place: RunPlace | None = None,
    resume: bool = False,
    hooks: Sequence[Hook] = (),
    data: DatasetSplits | None = None,
) -> TrainResult:
    """Train ``cfg``, writing to ``place`` (see :class:`Trainer`); the single entry point used
    locally, by Ray Train workers and by Tune."""
    return Trainer(cfg, place, hooks, data).fit(resume=resume)
