"""AdamW, the warmup + cosine learning-rate schedule, and gradient clipping that works on FSDP2-sharded grads.

The learning rate is a pure function of the step (`lr_at`), set on the optimizer before each step, so the schedule
has no state of its own to checkpoint: restoring the step restores the schedule.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, extra_groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and 1-D params are not decayed).

    `extra_groups` are appended as-is (e.g. PRMU's user table with its own lr); their params are excluded from the
    default groups. Call after sharding, so the optimizer holds the sharded (DTensor) parameters."""
    taken = {id(p) for g in (extra_groups or []) for p in g["params"]}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if not p.requires_grad or id(p) in taken:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]] + list(extra_groups or [])
    for g in groups:
        g.setdefault("lr", lr)
        g["base_lr"] = g["lr"]  # the peak each group's schedule scales
    # foreach=False: the multi-tensor path is no faster on CPU and mixes badly with DTensors of different meshes.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def lr_at(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Schedule multiplier for optimizer step `step` (0-based): linear warmup from 1/warmup to 1 over warmup_steps,
    then cosine decay from 1 to min_lr_ratio at the last step. With a single step after warmup there is no room
    for the decay: that step runs at the peak (1), as the first step after warmup always does."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_note(warmup_steps: int, total_steps: int) -> str | None:
    """A line for the log when a warmup counted in steps does not end before the run does (a short debugging run of
    a config whose warmup fits its full length): the schedule then never reaches the peak, or never decays."""
    if warmup_steps < total_steps:
        return None
    return (f"warmup_steps={warmup_steps} is not below the run's {total_steps} steps: the learning rate rises to "
            f"{total_steps / warmup_steps:.0%} of lr at the last step and never decays")


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Set every group's lr to base_lr * multiplier; returns the first group's lr (for logging)."""
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", g["lr"]) * multiplier
    return optimizer.param_groups[0]["lr"]


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Total L2 norm of all gradients (across every rank's shards), clipping to max_norm when max_norm > 0.

    With FSDP2 the grads are DTensors sharded over the mesh; torch's clip_grad_norm_ reduces their local norms
    across ranks and returns a replicated DTensor, which `full_tensor()` turns into the global value."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=False)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
