"""The token-level NLL step used by SFT: forward + backward over the micro-batches of one optimizer step.

Normalisation (torchtitan's; ../shared/docs/design.md, "Known traps": loss normalisation): with N the number of
valid target tokens (targets != -100) in the *whole* optimizer step -- summed over every micro-batch on every rank, all-reduced before
any backward pass -- each micro-batch contributes
    L_mb = -sum_{valid t in mb} log p(y_t) / N
and the gradients of all micro-batches and ranks are *summed* (FSDP's divide factor is set to 1 in
`distributed.shard_model`). The step's gradient is then exactly that of the mean NLL over one big batch, whatever
the number of ranks or accumulation steps.
"""
from __future__ import annotations

import math

import torch

from minitagpr.distributed import all_reduce_sum
from minitagpr.train.sft_data import IGNORE_INDEX


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm of a step is NaN or infinite; training stops before the optimizer step."""


def count_tokens(micro_batches: list[dict[str, torch.Tensor]], device) -> tuple[torch.Tensor, int]:
    """(N, slots): valid target tokens (a 0-d float64 tensor) and input token slots of this step (padding of the
    shorter rows of a micro-batch included), summed over all micro-batches and ranks (one all-reduce)."""
    valid = sum(int((mb["targets"] != IGNORE_INDEX).sum()) for mb in micro_batches)
    tokens = sum(mb["input_ids"].numel() for mb in micro_batches)
    counts = all_reduce_sum(torch.tensor([valid, tokens], dtype=torch.float64, device=device))  # (2,)
    return counts[0], int(counts[1].item())


def nll_forward_backward(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], device,
                         step: int) -> dict[str, float]:
    """Accumulate the gradient of mean NLL (see module docstring); returns the step's loss and its global token
    counts (valid_tokens = N, tokens = input token slots processed, padding included).

    Raises NonFiniteLossError naming `step` (the 1-based step number the metrics and checkpoints use) when the global
    loss is not finite (the same on every rank)."""
    n_valid, tokens = count_tokens(micro_batches, device)  # the same on every rank
    if n_valid.item() == 0:
        raise ValueError(f"step {step}: the global batch holds no target tokens")
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    for mb in micro_batches:
        # L_mb = sum_t w_t logp_t with w_t = -1/N on valid targets: linear in logp, so the fused head forms its
        # gradient in the forward (no logits recompute); masked targets contribute exactly 0
        weights = (mb["targets"] != IGNORE_INDEX).float() / -n_valid.float()  # (b, T)
        loss_mb, logp = model(mb["input_ids"], mb["position_ids"], targets=mb["targets"], token_weights=weights)
        loss_mb.backward()
        nll_sum += -logp.sum().double()  # logp (b, T) fp32, detached; -100 -> 0
    loss = (all_reduce_sum(nll_sum) / n_valid).item()
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"non-finite loss ({loss}) at step {step}; stopping before the optimizer step "
                                 "(lower the learning rate, check the data, or resume from the last checkpoint)")
    return {"loss": loss, "valid_tokens": int(n_valid.item()), "tokens": tokens}
