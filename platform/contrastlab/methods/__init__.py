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


def build_method(cfg: Config, num_train: int) -> Method:
    """Instantiate ``cfg.method.name`` from :data:`METHODS`."""
    return METHODS[cfg.method.name](cfg, num_train)


__all__ = ["METHODS", "Method", "build_method"]
