"""Chunked torch log-probs: per-token log p(y_t) and entropy without materialising the (N, V) logits.

Notation (per token row t, vocabulary index j, temperature tau):
    z_tj = (h_t . w_j) / tau                      logits, fp32
    lse_t = log sum_j exp(z_tj)                   log-partition
    logp_t = z_t,y_t - lse_t                      log-probability of the target y_t
    p_tj = exp(z_tj - lse_t)                      softmax
    H_t = -sum_j p_tj log p_tj = lse_t - sum_j p_tj z_tj     entropy
Gradient with upstream g_t = dL/dlogp_t and gH_t = dL/dH_t:
    dL/dz_tj = g_t (1[j = y_t] - p_tj) - gH_t p_tj (log p_tj + H_t)
    dL/dh_t = sum_j dL/dz_tj w_j / tau,   dL/dw_j = sum_t dL/dz_tj h_t / tau.

Tokens are processed `chunk_size` rows at a time, so the largest temporary is (chunk_size, V) fp32. The forward
saves only the inputs, lse (N,) and, when asked for, the entropy (N,); the backward recomputes each chunk's logits
(one extra matmul, the price of never keeping N x V). Every target here is a valid id: ignore_index rows are removed
by the dispatcher.
"""
from __future__ import annotations

import math

import torch

# The hidden gradient sums over the whole vocabulary (K = V = 151,936 in one matmul). A GEMM accumulates that
# K sequentially in fp32 (error ~ sqrt(V) eps ~ 3e-5); summing 2048-wide blocks separately and then adding the
# block results keeps it near 1e-6 for ~10% more time on that one matmul. Blocks are done VOCAB_GROUP at a time
# to bound the buffer of partial sums.
VOCAB_BLOCK = 2048
VOCAB_GROUP = 16

# Scratch memory per chunk when the caller does not pick a chunk size: big enough that each chunk's matmuls
# amortise packing the (V, H) weight and streaming the (V, H) weight gradient over hundreds of rows, small next
# to that (V, H) gradient itself.
CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 32


def default_chunk_size(vocab_size: int, hidden_size: int) -> int:
    """Token rows per chunk so that a chunk's scratch, (rows, V) logits plus the (VOCAB_GROUP, rows, H) partial
    sums of the backward, is about CHUNK_BYTES."""
    row_bytes = 4 * vocab_size + 4 * VOCAB_GROUP * hidden_size
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // row_bytes)


class Scratch:
    """Named buffers reused by every chunk of one call. On a CPU a fresh 100 MB tensor per chunk costs page
    faults (the OS zero-fills each new page) of the same order as the arithmetic on it; CUDA's caching allocator
    already reuses memory, so there the buffers are simply allocated."""

    def __init__(self, device: torch.device):
        self.reuse = device.type == "cpu"
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if not self.reuse or buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            if self.reuse:
                self.buffers[name] = buf
        return buf[:numel].view(shape)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with an fp32 result; low-precision inputs accumulate and return in fp32 (no bf16 rounding of logits)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)  # tensor-core matmul with fp32 output
    return torch.mm(a.float(), b.float(), out=out)  # CPU has no mixed-dtype mm: upcast (callers upcast the weight)


def _mm_over_vocab(dz: torch.Tensor, w: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """(C, V) @ (V, H) -> (C, H) fp32, with the V-long reduction done in VOCAB_BLOCK pieces for fp32 operands
    (low-precision operands already carry far more rounding than the long sum adds)."""
    c, v = dz.shape
    h = w.shape[1]
    n_blocks = v // VOCAB_BLOCK
    if n_blocks <= 1 or dz.dtype != torch.float32 or w.dtype != torch.float32:
        return _mm_fp32(dz, w)
    out = torch.zeros(c, h, dtype=torch.float32, device=dz.device)  # (C, H)
    for b0 in range(0, n_blocks, VOCAB_GROUP):
        nb = min(VOCAB_GROUP, n_blocks - b0)
        cols = slice(b0 * VOCAB_BLOCK, (b0 + nb) * VOCAB_BLOCK)
        dz_blocks = dz[:, cols].view(c, nb, VOCAB_BLOCK).transpose(0, 1)  # (nb, C, B) strided view, no copy
        w_blocks = w[cols].view(nb, VOCAB_BLOCK, h)  # (nb, B, H)
        out += torch.bmm(dz_blocks, w_blocks, out=scratch("partial", nb, c, h)).sum(dim=0)  # block sums, then add
    main = n_blocks * VOCAB_BLOCK
    if main < v:
        out += dz[:, main:] @ w[main:]  # the tail block of the vocabulary
    return out


def _compute_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight operand used for the chunk matmuls: as is where fp32 output is native, else upcast once."""
    if weight.dtype == torch.float32 or weight.is_cuda:
        return weight
    return weight.float()  # (V, H) fp32 copy: CPU low-precision path only


@torch.no_grad()
def chunked_forward(hidden, weight, targets, temperature: float, with_entropy: bool, chunk_size: int):
    """Forward pass over token chunks. Returns (logp (N,), entropy (N,) | None, lse (N,)), all fp32."""
    n = hidden.shape[0]
    w = _compute_weight(weight)
    inv_tau = 1.0 / temperature
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,) fp32
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,) fp32
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None  # (N,) fp32
    scratch = Scratch(hidden.device)
    vocab = weight.shape[0]
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z = _mm_fp32(hidden[start:end], w.T, out=scratch("z", end - start, vocab))  # (C, V) fp32, the big one
        if temperature != 1.0:
            z.mul_(inv_tau)
        m = z.amax(dim=1, keepdim=True)  # (C, 1) row max: exp never overflows and every row keeps exp(0) = 1
        z.sub_(m)  # z - m <= 0 exactly, so logp below is <= 0 exactly
        z_target = z.gather(1, targets[start:end, None]).squeeze(1)  # (C,) z_y - m
        # (C, V) exp(z - m); the entropy still needs z - m, so it gets its own buffer
        e = torch.exp(z, out=scratch("e", end - start, vocab)) if with_entropy else z.exp_()
        s = e.sum(dim=1)  # (C,) >= 1 because the max element contributes exp(0)
        log_s = torch.log(s)  # (C,) >= 0
        lse[start:end] = m.squeeze(1) + log_s
        logp[start:end] = z_target - log_s
        if with_entropy:
            # H = log s - sum_j e_j (z_j - m) / s: every term is >= 0, no cancellation against the size of m
            ez = torch.linalg.vecdot(e, z, dim=1)  # (C,) <= 0
            entropy[start:end] = log_s - ez / s
    return logp, entropy, lse


def scaled_row_grads(grad_logp, grad_entropy, n: int, temperature: float, device):
    """Upstream gradients as fp32 rows with the 1/tau of z = h.w / tau folded in: (g (N,), gH (N,) | None)."""
    inv_tau = 1.0 / temperature
    g = grad_logp.float() * inv_tau if grad_logp is not None else torch.zeros(n, device=device)  # (N,)
    g_h = grad_entropy.float() * inv_tau if grad_entropy is not None else None  # (N,) or None
    return g, g_h


@torch.no_grad()
def backward_over_chunks(hidden, weight, chunk_size: int, need_hidden: bool, need_weight: bool, dlogits,
                         scratch: Scratch):
    """The shared backward loop: per token chunk, dz = dlogits(start, end, w) (C, V) is dL/d(h.w) for that
    chunk; then dL/dh_c = dz @ w and dL/dw += dz^T @ h_c. Returns (grad_hidden | None, grad_weight | None)."""
    n = hidden.shape[0]
    w = _compute_weight(weight)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (N, H)
    # fp32 accumulator for the weight gradient: summing N chunks in bf16 would lose the small contributions.
    # Left unfilled when a first chunk will write it with beta = 0 (saves zero-filling V x H floats).
    alloc = torch.empty if n > 0 else torch.zeros
    grad_w = alloc(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None  # (V, H)
    low_precision_cuda = hidden.is_cuda and hidden.dtype != torch.float32
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h_c = hidden[start:end]  # (C, H)
        dz = dlogits(start, end, w)  # (C, V)
        if low_precision_cuda:
            dz = dz.to(hidden.dtype)  # tensor-core operands; the products still accumulate in fp32
        if need_hidden:
            grad_hidden[start:end] = _mm_over_vocab(dz, w, scratch).to(hidden.dtype)
        if need_weight:
            beta = 0.0 if start == 0 else 1.0  # beta = 0 ignores the unfilled buffer (NaN included)
            if low_precision_cuda:  # bf16 operands, fp32 accumulate straight into grad_w (no (V, H) temporary)
                torch.addmm(grad_w, dz.T, h_c, out_dtype=torch.float32, beta=beta, out=grad_w)
            else:
                grad_w.addmm_(dz.T, h_c.float(), beta=beta)  # (V, H) += (V, C) @ (C, H)
    if grad_w is not None and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    return grad_hidden, grad_w


@torch.no_grad()
def chunked_backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, temperature: float,
                     chunk_size: int, need_hidden: bool, need_weight: bool):
    """Gradients w.r.t. hidden (N, H) and weight (V, H), recomputing each chunk's logits with torch ops."""
    g, g_h = scaled_row_grads(grad_logp, grad_entropy, hidden.shape[0], temperature, hidden.device)
    scratch = Scratch(hidden.device)
    vocab = weight.shape[0]

    def dlogits(start, end, w):
        z = _mm_fp32(hidden[start:end], w.T, out=scratch("z", end - start, vocab))  # (C, V) fp32, recomputed
        if temperature != 1.0:
            z.mul_(1.0 / temperature)
        z.sub_(lse[start:end, None])  # log p
        g_c = g[start:end, None]  # (C, 1)
        if g_h is None:
            dz = z.exp_().mul_(-g_c)  # -g p
        else:
            p = torch.exp(z, out=scratch("p", end - start, vocab))  # (C, V)
            # dz = -p * (g + gH (log p + H)); the one-hot term g 1[j = y] is added below
            coef = z.add_(entropy[start:end, None]).mul_(g_h[start:end, None]).add_(g_c)
            dz = p.mul_(coef).neg_()
        return dz.scatter_add_(1, targets[start:end, None], g_c)  # + g at the target column

    return backward_over_chunks(hidden, weight, chunk_size, need_hidden, need_weight, dlogits, scratch)


class ChunkedLogprob(torch.autograd.Function):
    """Autograd wrapper: saves hidden, weight, targets, lse (and entropy); recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_size):
        logp, entropy, lse = chunked_forward(hidden, weight, targets, temperature, with_entropy, chunk_size)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its term entirely
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if entropy is None:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        grad_hidden, grad_weight = chunked_backward(
            hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, ctx.temperature, ctx.chunk_size,
            need_hidden, need_weight,
        )
        return grad_hidden, grad_weight, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Weighted sum with the gradient computed in the forward pass (no recompute)
#
# When the loss is linear in the log-probs, L = sum_t w_t logp_t with weights w_t known before the forward (SFT:
# w_t = -1 / N_valid), the upstream gradient of every logp_t is w_t already during the forward. So each chunk's
# dz = (w_t / tau)(1[j = y_t] - p_tj) can be formed right after its softmax, and dL/dh, dL/dw accumulated then:
# 3 matmuls over the vocabulary per chunk (logits, dL/dh, dL/dw) instead of 4 (logits again in the backward). The
# backward only scales the stored gradients by dL_outer/dL. Memory: the (V, H) weight gradient is held from the
# forward on instead of being made in the backward; scratch stays one chunk.


@torch.no_grad()
def chunked_weighted_sum(hidden, weight, targets, token_weights, temperature: float, chunk_size: int,
                         need_hidden: bool, need_weight: bool):
    """sum_t w_t logp_t, logp (N,), dL/dh (N, H) | None and dL/dw (V, H) | None in one pass over token chunks."""
    n = hidden.shape[0]
    inv_tau = 1.0 / temperature
    g_all = token_weights.float() * inv_tau  # (N,) upstream gradient of each logp_t, 1/tau of z = h.w/tau folded in
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,) fp32
    scratch = Scratch(hidden.device)
    vocab = weight.shape[0]

    def dlogits(start, end, w):
        z = _mm_fp32(hidden[start:end], w.T, out=scratch("z", end - start, vocab))  # (C, V) fp32
        if temperature != 1.0:
            z.mul_(inv_tau)
        m = z.amax(dim=1, keepdim=True)  # (C, 1)
        z.sub_(m)
        z_target = z.gather(1, targets[start:end, None]).squeeze(1)  # (C,) z_y - m
        e = z.exp_()  # (C, V) exp(z - m), in place
        s = e.sum(dim=1)  # (C,) >= 1
        logp[start:end] = z_target - torch.log(s)
        g_c = g_all[start:end, None]  # (C, 1)
        dz = e.mul_(-(g_c / s[:, None]))  # -g p
        return dz.scatter_add_(1, targets[start:end, None], g_c)  # + g at the target column

    if need_hidden or need_weight:
        grad_hidden, grad_weight = backward_over_chunks(hidden, weight, chunk_size, need_hidden, need_weight,
                                                        dlogits, scratch)
    else:  # nothing needs a gradient: the plain forward gives logp without forming dz
        logp = chunked_forward(hidden, weight, targets, temperature, False, chunk_size)[0]
        grad_hidden = grad_weight = None
    total = (token_weights.float() * logp).sum()  # () fp32
    return total, logp, grad_hidden, grad_weight


class ChunkedWeightedLogprobSum(torch.autograd.Function):
    """Autograd wrapper of `chunked_weighted_sum`: the forward stores dL/dh and dL/dw; the backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, temperature, chunk_size):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, logp, grad_hidden, grad_weight = chunked_weighted_sum(
            hidden, weight, targets, token_weights, temperature, chunk_size, need_hidden, need_weight)
        ctx.grads = (grad_hidden, grad_weight)  # intermediates owned by this node, freed after its backward
        # dL/d token_weights = logp (L is linear in them); kept only when asked for
        ctx.logp = logp if ctx.needs_input_grad[3] else None
        ctx.saved_dtype = token_weights.dtype
        ctx.mark_non_differentiable(logp)
        return total, logp

    @staticmethod
    def backward(ctx, grad_total, _grad_logp):
        if ctx.grads is None:
            raise RuntimeError("weighted_logprob_sum: a second backward through the same forward is not supported "
                               "(its gradients were computed in the forward and handed out by the first backward)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # handed to autograd below; scaled in place, so a second use would be wrong
        if grad_hidden is not None:
            grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_total.to(grad_weight.dtype))
        grad_token_weights = None
        if ctx.logp is not None:
            grad_token_weights, ctx.logp = (grad_total * ctx.logp).to(ctx.saved_dtype), None
        return grad_hidden, grad_weight, None, grad_token_weights, None, None
