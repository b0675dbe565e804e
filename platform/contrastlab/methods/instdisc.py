"""InstDisc (Wu et al. 2018, arXiv:1805.01978): non-parametric instance discrimination.

Every training image is its own class. The "class weights" are a memory bank holding one
L2-normalised feature per image (``MemoryBank``); one augmented view of each image is scored
against the bank, either by NCE with ``nce_k`` noise rows drawn uniformly from the bank, or,
with ``nce_k = 0``, by the exact softmax over the whole bank. After the optimizer step the
bank rows of the batch are blended with the new features (momentum ``bank_momentum``) and
renormalised. Reference code: zhirongw/lemniscate.pytorch (``lib/NCEAverage.py``,
``lib/NCECriterion.py``, ``lib/LinearAverage.py``, ``main.py``, ``cifar.py``).

Where we deliberately differ from upstream, and why:

* The NCE normaliser Z is a Monte Carlo estimate over the noise samples only, as the paper
  writes it (upstream also averages in the positive column). ``z_estimate='first_batch'``
  (upstream and paper: estimate once, then keep it constant) or ``'every_batch'``. Z is a
  buffer, so a resumed run keeps the estimate it started with. Under DDP the first-batch
  estimate is the mean over every worker's samples, so all workers use the same Z (upstream
  lets each worker estimate its own).
* The bank starts as normalised Gaussian draws seeded from ``train.seed`` (the paper's "random
  unit vectors"); upstream starts from uniform draws of about unit norm, not normalised.
* The proximal term of the paper (Sec. 3.3), ``lambda * ||f_i - v_i||^2`` with ``v_i`` the
  bank row before this step, is ``method.proximal_weight``. Upstream has no such term, and we
  found no value the paper names for its reported runs, so the default is 0 (= upstream).
* The bank update happens in ``on_step_end`` (after the optimizer step) with the features of
  this step, which is what upstream's custom backward does; the loss of the step sees the
  bank from before the update in both cases.
* The head defaults to one linear layer (``InstDiscConfig.defaults``), as the upstream fc to 128-d.

Small datasets: a Z fixed on the first batch is estimated against the random initial bank.
When a batch is a large share of the dataset (digits: 256 of 1347 images), the whole bank is
rewritten within an epoch with features of the young encoder, which resemble each other far
more than random rows do; the fixed Z then underestimates the normaliser by orders of
magnitude, every noise term saturates, and on digits the features collapse (kNN 85.5% ->
22-46% within 5-15 epochs, tried with lr 0.3 and 0.03, batch 256 and 64, linear and MLP
heads). ``z_estimate='every_batch'`` (or ``nce_k=0``) learns there. On ImageNet- or
CIFAR-sized banks a step rewrites a small fraction of the bank: the regime the paper's choice
is for.

DDP: every worker holds a full replica of the bank. The indices and the features of every
worker are gathered (``gather_cat_nograd``) and every replica applies the same update, so the
replicas stay identical (``tests/test_method_instdisc.py`` checks it over two processes).
Noise rows are drawn independently per worker, from a generator seeded by (``train.seed``,
step, rank): in one process each image already draws its own K rows independently of the
other images, and per-worker draws keep exactly that for a global batch split over workers,
whereas identical draws would give image ``b`` of every worker the same noise rows. The
noise never changes the bank update, so this choice cannot make the replicas diverge. The
step count is a buffer: a resumed run draws what the uninterrupted run would have.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from contrastlab.config import Config, ConfigError, InstDiscConfig
from contrastlab.distributed import gather_cat_nograd, rank, world_size
from contrastlab.losses import (
    instance_softmax_loss,
    nce_log_partition,
    nce_logits,
    nce_loss,
    proximal_loss,
)
from contrastlab.methods.base import Method
from contrastlab.models import MemoryBank


class InstDisc(Method):
    n_views = 1

    log_z: torch.Tensor
    steps: torch.Tensor

    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        m = cfg.method
        assert isinstance(m, InstDiscConfig)
        if m.nce_k >= num_train:
            raise ConfigError(
                f"method.nce_k ({m.nce_k}) must be smaller than the number of training images "
                f"({num_train} in {cfg.data.dataset}): the noise rows are drawn from a bank of "
                f"{num_train}; lower it, or set method.nce_k=0 for the full softmax"
            )
        self.n_views = 1
        self.temperature, self.nce_k = m.temperature, m.nce_k
        self.z_estimate, self.proximal_weight = m.z_estimate, m.proximal_weight
        self.num_train, self.seed = num_train, cfg.train.seed
        gen = torch.Generator().manual_seed(cfg.train.seed)
        self.bank = MemoryBank(num_train, self.proj_dim, m.bank_momentum, generator=gen)
        # log Z of the NCE normaliser; NaN until estimated (first_batch), then constant
        self.register_buffer("log_z", torch.tensor(float("nan")))
        # optimizer steps taken: seeds each step's noise draw, saved with the checkpoint
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # Host copies of the two buffers, so a step needs no device-to-host sync; refreshed
        # after load_state_dict.
        self._steps = 0
        self._z_known = False
        self._noise_gen: torch.Generator | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(_refresh_host_copies)

    def _noise_generator(self) -> torch.Generator:
        device = self.bank.rows.device
        if self._noise_gen is None or self._noise_gen.device != device:
            self._noise_gen = torch.Generator(device=device)
        seed = ((self.seed * 1_000_003 + self._steps) * 1_000_003 + rank()) % (2**63)
        return self._noise_gen.manual_seed(seed)

    def _log_partition(self, noise_logits: torch.Tensor) -> torch.Tensor:
        """log Z from this step's noise logits [B, K], combined over workers (equal weights)."""
        local = nce_log_partition(noise_logits.detach(), self.num_train).reshape(1)
        every = gather_cat_nograd(local)  # [world]
        return torch.logsumexp(every, dim=0) - math.log(world_size())

    def training_step(self, views, labels, index):  # type: ignore[override]
        f = F.normalize(self.project(views[0]).float(), dim=1)  # [B, D]
        previous = self.bank(index)  # [B, D], v_i^(t-1)
        metrics: dict[str, torch.Tensor] = {}
        if self.nce_k == 0:
            loss, _ = instance_softmax_loss(f, self.bank.rows, index, self.temperature)
        else:
            noise_idx = torch.randint(
                self.num_train,
                (f.shape[0], self.nce_k),
                generator=self._noise_generator(),
                device=self.bank.rows.device,
            )
            logits = nce_logits(f, previous, self.bank(noise_idx), self.temperature)  # [B, 1+K]
            if self.z_estimate == "every_batch" or not self._z_known:
                log_z = self._log_partition(logits[:, 1:])
                if self.z_estimate == "first_batch":
                    self.log_z.copy_(log_z)
                    self._z_known = True
            else:
                log_z = self.log_z
            loss = nce_loss(logits, log_z, self.num_train)
            metrics["log_z"] = log_z.detach().clone()
        prox = proximal_loss(f, previous)
        if self.proximal_weight > 0:
            loss = loss + self.proximal_weight * prox
        # every replica of the bank gets every worker's rows, applied after the optimizer step
        self._pending = (gather_cat_nograd(index), gather_cat_nograd(f.detach()))
        return loss, {"loss": loss.detach(), "proximal": prox.detach(), **metrics}

    def on_step_end(self) -> None:
        if self._pending is not None:
            self.bank.update(*self._pending)
            self._pending = None
        self._steps += 1
        self.steps.fill_(self._steps)


def _refresh_host_copies(module: torch.nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, InstDisc)
    module._steps = int(module.steps)
    module._z_known = bool(torch.isfinite(module.log_z))
    module._pending = None
