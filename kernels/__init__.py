"""Fused per-token log-prob (+ entropy) kernels, shipped as `minitagpr.kernels` (folder kernels/)."""
from .logprob import IMPLS, token_logprobs, triton_available, weighted_logprob_sum

__all__ = ["IMPLS", "token_logprobs", "triton_available", "weighted_logprob_sum"]
