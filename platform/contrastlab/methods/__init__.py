"""The method registry. The key is the file name, the config's ``method.name``, the search
space name and the MLflow tag.

A method is two classes: its :class:`~contrastlab.config.MethodConfig` subclass (fields,
defaults, reported metrics, tiny and small-data settings, cross-field rules) and its
:class:`Method` (the training step). :func:`register_method` makes both known; everything else
(configs, sweeps and their smoke tests, ablations, benchmarks, the method table) reads the
registry. A method outside this package registers itself in its own module, which is imported
when its name is listed in the ``CONTRASTLAB_METHODS`` environment variable (see
:mod:`contrastlab.config`), so that Ray workers know it too.
"""

from __future__ import annotations

from contrastlab.config import (
    CMCConfig,
    Config,
    ConfigError,
    CPCConfig,
    EMPSSLConfig,
    InstDiscConfig,
    InvaSpreadConfig,
    MethodConfig,
    MoCoConfig,
    SimCLRConfig,
    SupConConfig,
    import_method_modules,
    register_method_config,
)
from contrastlab.methods.base import Method
from contrastlab.methods.cmc import CMC
from contrastlab.methods.cpc import CPC
from contrastlab.methods.emp_ssl import EMPSSL
from contrastlab.methods.instdisc import InstDisc
from contrastlab.methods.invaspread import InvaSpread
from contrastlab.methods.moco import MoCo
from contrastlab.methods.simclr import SimCLR
from contrastlab.methods.supcon import SupCon

METHODS: dict[str, type[Method]] = {}
"""``method.name`` -> the :class:`Method` class that trains it."""


def register_method(method: type[Method], config: type[MethodConfig]) -> None:
    """Register a method: its training class and its config class (whose ``name`` is the key).

    Raises:
        ConfigError: The name is taken by other classes, or ``method`` is not a Method.
    """
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise ConfigError(f"register_method: {method!r} is not a subclass of Method")
    register_method_config(config)
    name = config.model_fields["name"].default
    known = METHODS.get(name)
    if known is not None and known is not method:
        raise ConfigError(f"method {name!r} is already registered by {known.__qualname__}")
    METHODS[name] = method


for _method, _config in (
    (SimCLR, SimCLRConfig),
    (SupCon, SupConConfig),
    (MoCo, MoCoConfig),
    (EMPSSL, EMPSSLConfig),
    (InstDisc, InstDiscConfig),
    (InvaSpread, InvaSpreadConfig),
    (CMC, CMCConfig),
    (CPC, CPCConfig),
):
    register_method(_method, _config)
import_method_modules()  # methods of the user's own (config.METHODS_ENV)


def build_method(cfg: Config, num_train: int) -> Method:
    """Instantiate ``cfg.method.name`` from :data:`METHODS`."""
    return METHODS[cfg.method.name](cfg, num_train)


__all__ = ["METHODS", "Method", "build_method", "register_method"]
