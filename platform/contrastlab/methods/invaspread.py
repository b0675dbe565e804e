"""InvaSpread (Ye et al. 2019, arXiv:1904.03436): invariant and spreading instance features.

Two augmented views of every image, encoded end to end in one pass (no memory bank, no
momentum encoder). Each embedding is an anchor; its positive is the other view of the same
image and every other embedding of the batch (both views) is a negative. The loss is the
log-probability of the positive under the softmax over the batch plus ``log(1 - P)`` of every
negative (``invaspread_loss``). Reference code: mangye16/Unsupervised_Embedding_Learning
(``BatchAverage.py``: ``BatchAverage`` and ``BatchCriterion``; ``demo_seen.py``).

Where we deliberately differ from upstream, and why:

* Upstream takes the non-anchor side of every similarity from ``feat.data`` (no gradient).
  That choice changes the gradient, so it is the explicit ``method.detach_other`` (default
  ``True``, as upstream) rather than a hidden one.
* Upstream's ``--batch-m`` (``negM``: weight of the negatives, and hard-negative top-k mining
  when below 1) is left out: the paper's loss is ``negM = 1``.
* The head defaults to one linear layer (``InvaSpreadConfig.defaults``), as upstream's fc to 128-d.

DDP: negatives come from every worker. The embeddings are gathered with the differentiable
``gather_cat`` (as SimCLR), every worker computes the loss of the global batch, and averaging
the gradients over workers gives the single-process gradient.
"""

from __future__ import annotations

from contrastlab.config import Config, InvaSpreadConfig
from contrastlab.distributed import gather_cat
from contrastlab.losses import invaspread_loss
from contrastlab.methods.base import Method


class InvaSpread(Method):
    def __init__(self, cfg: Config, num_train: int) -> None:
        super().__init__(cfg, num_train)
        assert isinstance(cfg.method, InvaSpreadConfig)
        self.temperature = cfg.method.temperature
        self.detach_other = cfg.method.detach_other
        self.n_views = 2

    def training_step(self, views, labels, index):  # type: ignore[override]
        z = self.project_views(views).float()  # [2, B, D]; both views share BatchNorm stats
        z = gather_cat(z, dim=1)  # [2, B_all, D]: negatives from every worker
        loss = invaspread_loss(z, self.temperature, self.detach_other)
        return loss, {"loss": loss.detach()}
