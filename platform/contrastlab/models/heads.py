"""Projection heads."""

from __future__ import annotations

from torch import nn


def build_head(
    kind: str, in_dim: int, hidden_dim: int, out_dim: int, layers: int, batchnorm: bool
) -> tuple[nn.Module, int]:
    """Build a projection head; returns ``(module, output_dim)``.

    Args:
        kind: ``"mlp"`` (``layers`` linear layers, ReLU between, optional BatchNorm, as in
            SimCLR/MoCo v2), ``"linear"`` (one linear layer, MoCo v1/InstDisc) or ``"none"``
            (identity: the loss sees backbone features).
        in_dim: backbone feature width F.
        hidden_dim: width of the hidden MLP layers.
        out_dim: projection width.
        layers: number of linear layers of the MLP (>= 1).
        batchnorm: BatchNorm1d after each hidden linear layer.
    """
    if kind == "none":
        return nn.Identity(), in_dim
    if kind == "linear" or layers == 1:
        return nn.Linear(in_dim, out_dim), out_dim
    if kind != "mlp":
        raise ValueError(f"model.head: unknown head {kind!r}; allowed: mlp, linear, none")
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        # bias is redundant right before BatchNorm
        mods.append(nn.Linear(dim, hidden_dim, bias=not batchnorm))
        if batchnorm:
            mods.append(nn.BatchNorm1d(hidden_dim))
        mods.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*mods), out_dim
