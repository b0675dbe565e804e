"""The method registry. The key is the file name, the config's ``method.name``, the search
space name and the MLflow tag."""

from __future__ import annotations

from contrastlab.config import Config
from contrastlab.methods.base import Method
from contrastlab.methods.cmc import CMC
from contrastlab.methods.cpc import CPC
from contrastlab.methods.emp_ssl import EMPSSL
from contrastlab.methods.instdisc import InstDisc
from contrastlab.methods.invaspread import InvaSpread
from contrastlab.methods.moco import MoCo
from contrastlab.methods.simclr import SimCLR
from contrastlab.methods.supcon import SupCon

METHODS: dict[str, type[Method]] = {
    "simclr": SimCLR,
    "supcon": SupCon,
    "moco": MoCo,
    "emp_ssl": EMPSSL,
    "instdisc": InstDisc,
    "invaspread": InvaSpread,
    "cmc": CMC,
    "cpc": CPC,
}

# Settings a method needs on a training set of a few thousand images or fewer (the 1347-1400
# of digits and the learnability tasks), as `--set`-style overrides. Every small-data
# pipeline (pipelines/method_table.py, pipelines/learnability.py) starts from this one table.
SMALL_DATA: dict[str, tuple[str, ...]] = {
    "simclr": (),
    "supcon": (),
    # K must stay well below the training images, or the queue holds the positives
    "moco": ("method.queue_size=1024",),
    # 8 patches per image instead of 20: EMP-SSL's step costs num_patches forward passes, and
    # these sets are for many short CPU runs
    "emp_ssl": ("method.num_patches=8",),
    # InstDisc: nce_k below the training images; Z re-estimated every batch, because with the
    # paper's first-batch Z the small bank fills with look-alike rows of the young encoder
    # and NCE collapses (digits: kNN 85.5% -> 22-46%); SGD lr 0.03 as upstream's ImageNet script
    "instdisc": ("method.nce_k=1024", "method.z_estimate=every_batch", "optim.lr=0.03"),
    "invaspread": (),
    # CMC: split R | GB, each view from its own crop: Lab's ab view is constant on gray images
    # (digits, position), and one shared crop would give two identical gray views
    "cmc": ("method.colorspace=rgb", "method.shared_crop=false"),
    # CPC: a small patch grid needs no 5-block context stack; at SGD lr 0.3 the digits kNN
    # stalls near the random encoder's 71.7% (74.6% best) while the task is solved
    "cpc": ("method.context_layers=2", "method.context_hidden_dim=128", "optim.lr=0.03"),
}


def build_method(cfg: Config, num_train: int) -> Method:
    """Instantiate ``cfg.method.name`` from :data:`METHODS`."""
    return METHODS[cfg.method.name](cfg, num_train)


__all__ = ["METHODS", "SMALL_DATA", "Method", "build_method"]
