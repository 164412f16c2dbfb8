"""The one entry point for per-token log-probs (and entropy) of a linear head: `token_logprobs`.

SFT uses NLL = -logp, RL uses logp (and optionally the entropy) of the sampled tokens. Three implementations
compute the same numbers:
    "naive"  full (N, V) logits -> log_softmax -> gather: the baseline, memory O(N V)
    "torch"  chunked over tokens, logits recomputed in backward (kernels/chunked.py): memory O(chunk V)
    "triton" tiled over tokens x vocab with an online log-sum-exp (kernels/triton_logprob.py), for GPUs
"auto" picks Triton for CUDA tensors when Triton imports, else the chunked torch path.

`weighted_logprob_sum` is the loss-shaped twin for losses linear in logp (SFT's NLL): sum_t w_t logp_t with the
weights known up front, so the chunked path computes the gradients in the forward and never recomputes logits. On
CUDA its "auto" still picks the Triton log-probs (recomputing in the backward): faster on the card than chunking.
"""
from __future__ import annotations

import importlib.util

import torch

from .chunked import ChunkedLogprob, ChunkedWeightedLogprobSum, chunked_forward, default_chunk_size

IMPLS = ("auto", "torch", "triton", "naive")


def triton_available() -> bool:
    """True when the triton package can be imported (the kernels are compiled lazily on first use)."""
    return importlib.util.find_spec("triton") is not None


def _check_inputs(hidden, weight, targets, temperature, impl, chunk_size) -> None:
    """Raise ValueError naming the argument for every malformed input."""
    where = "token_logprobs"
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl must be one of {IMPLS}, got {impl!r}")
    if hidden.dim() != 2:
        raise ValueError(f"{where}: hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{where}: targets must be 1-D (N,) with N = {hidden.shape[0]} (hidden rows), "
                         f"got shape {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden (N, H={hidden.shape[1]}) and weight (V, H={weight.shape[1]}) "
                         "disagree on H")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"{where}: hidden and weight must share one floating dtype, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{where}: targets must be int64 or int32 token ids, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"{where}: hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if not (isinstance(temperature, (int, float)) and 0 < float(temperature) < float("inf")):
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{where}: chunk_size must be a positive int or None, got {chunk_size!r}")


def _valid_rows(targets, vocab: int, ignore_index: int, where: str) -> torch.Tensor:
    """(N,) bool: rows with a target. Raises ValueError naming the first id outside [0, vocab) that is not ignored."""
    valid = targets != ignore_index
    out_of_range = valid & ((targets < 0) | (targets >= vocab))
    if bool(out_of_range.any()):
        row = int(out_of_range.nonzero()[0, 0])
        raise ValueError(f"{where}: targets[{row}] = {int(targets[row])} is outside [0, {vocab}) and is not "
                         f"ignore_index ({ignore_index})")
    return valid


def _naive(hidden, weight, targets, temperature, with_entropy):
    """Baseline: materialise all logits. Plain autograd; memory O(N V)."""
    logits = (hidden @ weight.T).float()  # (N, V) fp32, very big
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)  # (N, V) fp32, very big
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)  # (N,)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1) if with_entropy else None  # (N,)
    return logp, entropy


def _resolve(impl: str, hidden: torch.Tensor) -> str:
    """"auto" -> Triton for CUDA tensors when Triton imports, else the chunked torch path."""
    if impl != "auto":
        return impl
    return "triton" if hidden.is_cuda and triton_available() else "torch"


def _dispatch(hidden, weight, targets, temperature, with_entropy, impl, chunk_size):
    """Run one implementation on rows whose targets are all valid ids."""
    impl = _resolve(impl, hidden)
    if impl == "naive":
        return _naive(hidden, weight, targets, temperature, with_entropy)
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("token_logprobs: impl='triton' needs the triton package (pip install triton, or the "
                               "'triton' extra); use impl='torch' otherwise")
        from .triton_logprob import triton_token_logprobs  # imported lazily: TRITON_INTERPRET is read at import

        return triton_token_logprobs(hidden, weight, targets, temperature, with_entropy, chunk_size)
    chunk = chunk_size or default_chunk_size(weight.shape[0], weight.shape[1])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:  # old / reference log-probs: nothing saved for a backward
        logp, entropy, _ = chunked_forward(hidden, weight, targets, float(temperature), with_entropy, chunk)
        return logp, entropy
    return ChunkedLogprob.apply(hidden, weight, targets, float(temperature), with_entropy, chunk)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = False, ignore_index: int = -100, impl: str = "auto",
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(target) and (optionally) the entropy of softmax(hidden @ weight.T / temperature).

    hidden (N, H) and weight (V, H) share a float dtype; targets (N,) are ids in [0, V) or `ignore_index`.
    Returns logp (N,) fp32 (<= 0) and entropy (N,) fp32 (>= 0) or None. Rows whose target is `ignore_index`
    give logp = 0 and entropy = 0 and pass no gradient. Differentiable w.r.t. hidden and weight.
    `chunk_size` sets the token rows per chunk (torch) or per backward block (triton); None picks by V.
    """
    _check_inputs(hidden, weight, targets, temperature, impl, chunk_size)
    valid = _valid_rows(targets, weight.shape[0], ignore_index, "token_logprobs")  # (N,) bool
    targets = targets.long()
    n = hidden.shape[0]
    if bool(valid.all()):
        return _dispatch(hidden, weight, targets, temperature, with_entropy, impl, chunk_size)
    # compute only the rows that have a target (SFT masks every prompt token), then scatter back with zeros
    rows = valid.nonzero().squeeze(1)  # (N_valid,)
    logp_v, entropy_v = _dispatch(hidden.index_select(0, rows), weight, targets.index_select(0, rows),
                                  temperature, with_entropy, impl, chunk_size)
    zeros = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # (N,) fp32
    logp = zeros.index_copy(0, rows, logp_v)
    entropy = zeros.index_copy(0, rows, entropy_v) if entropy_v is not None else None
    return logp, entropy


def weighted_logprob_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                         impl: str = "auto", chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L = sum_t token_weights_t * log p(target_t), and logp (N,) fp32 (detached), for a loss linear in logp.

    Same inputs as `token_logprobs` plus token_weights (N,) float (e.g. -1/N_valid for mean NLL). Rows whose target
    is `ignore_index` contribute nothing whatever their weight. "torch" computes dL/dhidden and dL/dweight in the
    forward pass (3 vocabulary matmuls per chunk instead of 4; the (V, H) weight gradient is held from the forward to
    the backward); only one backward per forward. "triton" is token_logprobs' Triton kernel (logits recomputed in
    the backward), weighted afterwards: on an H100 that path ran a Qwen3-0.6B training step 12% faster than the torch
    one (one round, bench/RESULTS.md). "auto" picks triton on CUDA when it is installed, else torch. "naive" is the
    plain autograd reference."""
    _check_inputs(hidden, weight, targets, temperature, impl, chunk_size)
    if token_weights.shape != targets.shape or not token_weights.is_floating_point():
        raise ValueError(f"weighted_logprob_sum: token_weights must be a float tensor of shape {tuple(targets.shape)}"
                         f" (one per target), got {token_weights.dtype} {tuple(token_weights.shape)}")
    if token_weights.device != targets.device:
        raise ValueError(f"weighted_logprob_sum: token_weights is on {token_weights.device}, targets on "
                         f"{targets.device}")
    valid = _valid_rows(targets, weight.shape[0], ignore_index, "weighted_logprob_sum")  # (N,) bool
    n = hidden.shape[0]
    rows = None
    if not bool(valid.all()):  # only rows with a target take part (SFT masks every prompt token)
        rows = valid.nonzero().squeeze(1)  # (N_valid,)
        hidden, targets, token_weights = (hidden.index_select(0, rows), targets.index_select(0, rows),
                                          token_weights.index_select(0, rows))
    targets = targets.long()
    impl = _resolve(impl, hidden)
    if impl in ("naive", "triton"):  # plain autograd through the log-probs, weighted afterwards
        logp_v, _ = _dispatch(hidden, weight, targets, temperature, False, impl, chunk_size)
        total, logp_v = (token_weights.float() * logp_v).sum(), logp_v.detach()
    else:
        chunk = chunk_size or default_chunk_size(weight.shape[0], weight.shape[1])
        if torch.is_grad_enabled():
            total, logp_v = ChunkedWeightedLogprobSum.apply(hidden, weight, targets, token_weights,
                                                            float(temperature), chunk)
        else:
            logp_v, _, _ = chunked_forward(hidden, weight, targets, float(temperature), False, chunk)
            total = (token_weights.float() * logp_v).sum()
    if rows is None:
        return total, logp_v
    return total, torch.zeros(n, dtype=torch.float32, device=logp_v.device).index_copy(0, rows, logp_v)
