"""Triton log-probs for GPUs: logits tiled over tokens x vocab, never written to memory in the forward.

Same notation as kernels/chunked.py (z = h.w / tau, lse, logp = z_y - lse, H = lse - sum_j p_j z_j).

Forward: program (token block, vocab split) walks its vocabulary tiles; each tile's logits (BLOCK_N, BLOCK_V)
are a tl.dot over H, then folded into a running max m, running sum s = sum_j exp(z_j - m) and (for the
entropy) b = sum_j exp(z_j - m) (z_j - m), rescaled whenever m grows:
    m' = max(m, max_j z_j),  s' = s e^(m - m') + sum_j e^(z_j - m'),
    b' = e^(m - m') (b + s (m - m')) + sum_j e^(z_j - m') (z_j - m').
The vocabulary tail of the last tile is masked to -inf (any V works). Splitting the vocabulary over programs
keeps a GPU busy at small N; the few partial (m, s, b) per row are merged in torch the same way. Then
lse = m + log s, logp = (z_y - m) - log s <= 0 and H = log s - b / s >= 0 (b <= 0, s >= 1).

Backward: per token chunk, one kernel recomputes the logits tile by tile and writes
dL/dz = g (1[j = y] - p) - gH p (log p + H) (already divided by tau) for that chunk only; the two matmuls
dL/dh = dz @ W and dL/dW += dz^T @ h then run on cuBLAS (kernels/chunked.backward_over_chunks).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunked import Scratch, backward_over_chunks, scaled_row_grads

try:  # TRITON_INTERPRET=1: the kernels run on CPU tensors in numpy (tests)
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton before knobs (< 3.4) reads the variable directly
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, n_rows, vocab, hidden_size, stride_h, stride_w, inv_tau,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """z = h[rows] . w[cols]^T / tau as a (BLOCK_N, BLOCK_V) fp32 tile; out-of-range rows and cols read zeros."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :],
                    mask=(rows[:, None] < n_rows) & (ks[None, :] < hidden_size), other=0.0)  # (BN, BK)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :],  # int64: V H can pass 2^31
                    mask=(cols[:, None] < vocab) & (ks[None, :] < hidden_size), other=0.0)  # (BV, BK)
        if UPCAST:  # the CPU interpreter's tl.dot mis-multiplies bf16 (triton 3.9): give it fp32 operands
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc * inv_tau


@triton.jit
def _logprob_fwd_kernel(h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, b_ptr, zt_ptr,
                        n_rows, vocab, hidden_size, stride_h, stride_w, inv_tau, tiles_per_split,
                        WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Partial (m, s, b, z_y) of one token block over one vocabulary split, stored at [split, row]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    targets = tl.load(t_ptr + rows, mask=rows < n_rows, other=-1)
    # -inf start: the first tile always holds a real column (splits start below V), so m is finite after it
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_start + tiles_per_split * BLOCK_V, vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, n_rows, vocab, hidden_size, stride_h, stride_w, inv_tau,
                         BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)  # (BN, BV) fp32
        in_vocab = cols[None, :] < vocab
        z = tl.where(in_vocab, z, float("-inf"))  # the vocabulary tail contributes exp(-inf) = 0
        z_target += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf), else <= 1
        shifted = tl.where(in_vocab, z - m_new[:, None], 0.0)  # z - m' <= 0; 0 (not -inf) in the tail
        e = tl.exp(z - m_new[:, None])  # (BN, BV)
        if WITH_ENTROPY:
            # on the first tile m = -inf and s = 0: shift by 0, not by -inf (0 * -inf would be NaN)
            m_prev = tl.where(m == float("-inf"), m_new, m)
            b = alpha * (b + s * (m_prev - m_new)) + tl.sum(e * shifted, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = split * n_rows + rows
    keep = rows < n_rows
    tl.store(m_ptr + out, m, mask=keep)
    tl.store(s_ptr + out, s, mask=keep)
    tl.store(zt_ptr + out, z_target, mask=keep)
    if WITH_ENTROPY:
        tl.store(b_ptr + out, b, mask=keep)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, ent_ptr, g_ptr, gh_ptr, dz_ptr,
                    n_rows, vocab, hidden_size, stride_h, stride_w, stride_dz, inv_tau,
                    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dz[rows, cols] = g (1[col = y] - p) - gH p (log p + H) for one (token block, vocab tile)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    keep_row = rows < n_rows
    z = _logits_tile(h_ptr, w_ptr, rows, cols, n_rows, vocab, hidden_size, stride_h, stride_w, inv_tau,
                     BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)  # (BN, BV) fp32
    lse = tl.load(lse_ptr + rows, mask=keep_row, other=0.0)
    g = tl.load(g_ptr + rows, mask=keep_row, other=0.0)  # already divided by tau
    targets = tl.load(t_ptr + rows, mask=keep_row, other=-1)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=keep_row, other=0.0)
        g_h = tl.load(gh_ptr + rows, mask=keep_row, other=0.0)
        coef = g[:, None] + g_h[:, None] * (log_p + ent[:, None])
    else:
        coef = g[:, None] + tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    dz = tl.where(cols[None, :] == targets[:, None], g[:, None], 0.0) - p * coef
    tl.store(dz_ptr + rows[:, None].to(tl.int64) * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=keep_row[:, None] & (cols[None, :] < vocab))


def _blocks(dtype: torch.dtype) -> dict:
    """Tile sizes: tensor-core sized on GPUs (not tuned on a GPU yet); small under the interpreter so tests cover
    several token blocks, vocabulary tiles, splits and tails."""
    if INTERPRET:
        return dict(BLOCK_N=32, BLOCK_V=128, BLOCK_K=32)
    if dtype == torch.float32:  # ieee fp32 dot: smaller K tile to fit the 4-byte operands in shared memory
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _dot_options(dtype: torch.dtype) -> dict:
    """fp32 inputs must not be rounded to tf32 (1e-5 target); bf16/fp16 use tensor cores as they are."""
    return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=INTERPRET)


def _num_splits(n_token_blocks: int, n_vocab_tiles: int, device) -> int:
    """How many programs share one token block's vocabulary: enough to fill the GPU (or, interpreted, to test
    the merge), never more than there are tiles."""
    if INTERPRET:
        want = 3
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(4 * sms, n_token_blocks)
    return max(1, min(want, n_vocab_tiles))


def _check_device(hidden: torch.Tensor) -> None:
    if not hidden.is_cuda and not INTERPRET:
        raise RuntimeError("token_logprobs: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
                           f"got tensors on {hidden.device}; use impl='torch'")


@torch.no_grad()
def triton_forward(hidden, weight, targets, temperature: float, with_entropy: bool):
    """(logp (N,), entropy (N,) | None, lse (N,)), fp32, from the tiled online log-sum-exp kernel."""
    _check_device(hidden)
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    cfg = _blocks(hidden.dtype)
    n_token_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    n_vocab_tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    tiles_per_split = triton.cdiv(n_vocab_tiles, _num_splits(n_token_blocks, n_vocab_tiles, hidden.device))
    splits = triton.cdiv(n_vocab_tiles, tiles_per_split)  # every split starts below V
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)  # m, s, b, z_y per split and row
    _logprob_fwd_kernel[(n_token_blocks, splits)](
        hidden, weight, targets, part[0], part[1], part[2], part[3],
        n, vocab, hidden_size, hidden.stride(0), weight.stride(0), 1.0 / temperature, tiles_per_split,
        WITH_ENTROPY=with_entropy, **_dot_options(hidden.dtype), **cfg,
    )
    m_k, s_k, b_k, z_k = part  # each (splits, N)
    m = m_k.amax(dim=0)  # (N,) global max
    scale = torch.exp(m_k - m)  # (splits, N) <= 1, and 1 for the split holding the max
    s = (s_k * scale).sum(dim=0)  # (N,) >= 1
    log_s = torch.log(s)
    lse = m + log_s
    logp = (z_k.sum(dim=0) - m) - log_s  # only the target's split has a nonzero z_y
    entropy = None
    if with_entropy:
        b = (scale * (b_k + s_k * (m_k - m))).sum(dim=0)  # (N,) <= 0, merged like the in-kernel rescale
        entropy = log_s - b / s
    return logp, entropy, lse


@torch.no_grad()
def triton_backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, temperature: float,
                    chunk_size: int, need_hidden: bool, need_weight: bool):
    """Gradients w.r.t. hidden and weight: dz per chunk from the recompute kernel, matmuls by cuBLAS."""
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    g, g_h = scaled_row_grads(grad_logp, grad_entropy, n, temperature, hidden.device)
    with_entropy = g_h is not None
    cfg = _blocks(hidden.dtype)
    # tensor-core operand dtype on GPUs; fp32 on CPU, where the shared loop multiplies in fp32 anyway
    dz_dtype = hidden.dtype if hidden.is_cuda else torch.float32
    scratch = Scratch(hidden.device)

    def dlogits(start, end, w):
        rows = end - start
        dz = scratch("dz", rows, vocab, dtype=dz_dtype)  # (C, V), the big temporary
        h_c = hidden[start:end]
        grid = (triton.cdiv(rows, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
        _dlogits_kernel[grid](
            h_c, weight, targets[start:end], lse[start:end],
            entropy[start:end] if with_entropy else lse[start:end],  # unused pointer when no entropy
            g[start:end], g_h[start:end] if with_entropy else g[start:end], dz,
            rows, vocab, hidden_size, h_c.stride(0), weight.stride(0), dz.stride(0), 1.0 / temperature,
            WITH_ENTROPY=with_entropy, **_dot_options(hidden.dtype), **cfg,
        )
        return dz

    return backward_over_chunks(hidden, weight, chunk_size, need_hidden, need_weight, dlogits, scratch)


def default_backward_chunk(n: int, vocab: int, element_size: int) -> int:
    """Token rows per backward chunk: one (rows, V) dz block of about 1 GiB on a GPU (64 MiB interpreted)."""
    budget = (64 if INTERPRET else 1024) * 2**20
    return max(16, min(n, budget // (vocab * element_size)))


class TritonLogprob(torch.autograd.Function):
    """Saves hidden, weight, targets, lse (and entropy); the backward recomputes logits tile by tile."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_size):
        logp, entropy, lse = triton_forward(hidden, weight, targets, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its term
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        if entropy is None:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        grad_hidden, grad_weight = triton_backward(
            hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, ctx.temperature, ctx.chunk_size,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return grad_hidden, grad_weight, None, None, None, None


def triton_token_logprobs(hidden, weight, targets, temperature, with_entropy, chunk_size):
    """Triton path of token_logprobs for rows whose targets are all valid ids."""
    _check_device(hidden)
    hidden, weight = hidden.contiguous(), weight.contiguous()  # the kernels assume unit stride along H
    targets = targets.contiguous()  # ... and along the targets (a strided view read other rows' ids)
    n = hidden.shape[0]
    if n == 0:  # no rows: nothing to launch; keep the graph connected so backward still runs
        empty = hidden.sum(dim=1).float() + weight.sum() * 0
        return empty, empty.clone() if with_entropy else None
    chunk = chunk_size or default_backward_chunk(n, weight.shape[0], 4 if not hidden.is_cuda else hidden.element_size())
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:  # old / reference log-probs: nothing saved for a backward
        logp, entropy, _ = triton_forward(hidden, weight, targets, float(temperature), with_entropy)
        return logp, entropy
    return TritonLogprob.apply(hidden, weight, targets, float(temperature), with_entropy, chunk)
