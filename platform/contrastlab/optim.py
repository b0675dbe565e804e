"""Optimizers (SGD, LARS, AdamW) and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from contrastlab.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), as used by SimCLR at large batch.

    For each parameter with ``lars_adapt`` set in its group, the update is scaled by the trust
    ratio ``eta * ||w|| / (||g + wd*w||)`` (1 when either norm is 0), then SGD with momentum.
    Groups with ``lars_adapt=False`` (biases, norm weights) get plain SGD with momentum.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adapt=True
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    w_norm, g_norm = p.norm(), g.norm()
                    # torch.where keeps this on device: no host sync per parameter
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    g = g.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into decayed weights and exempt biases / norm weights."""
    decay, exempt = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # 1-d parameters are biases and BatchNorm/LayerNorm scales
        (exempt if cfg.exclude_bias_and_norm and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0, "lars_adapt": False})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device):
    """Build the optimizer named by ``cfg.name`` over ``model``'s trainable parameters."""
    groups = param_groups(model, cfg)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    for g in groups:
        g.pop("lars_adapt", None)
    fused = cfg.fused and device.type == "cuda"
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused or None)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; allowed: sgd, lars, adamw")


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup rises linearly from lr/warmup_steps to ``lr`` over ``warmup_epochs``; the cosine
    then decays from ``lr`` to ``final_lr`` at the last step.
    """
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * progress))
