"""token_logprobs: every implementation against a float64 reference, plus the traps other stacks fell into.

Inputs are drawn fresh each run (no fixed seed); the seed is printed in the assertion message so a failure can
be replayed. Relative error is norm-wise: ||got - ref|| / ||ref||.
Triton cases run under TRITON_INTERPRET=1 on CPU (set below, before anything imports triton) at small sizes.
"""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the lazy import of the Triton kernels

from minitagpr.kernels import token_logprobs, triton_available, weighted_logprob_sum  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable (pip install triton)")
# every path incl. the naive baseline; tests using these stay at interpreter sizes (N <= 64, V <= 1000)
SMALL_IMPLS = ["torch", "naive", pytest.param("triton", marks=needs_triton)]
FP32_TOL = 1e-5
# bf16 inputs: logp and entropy still come from fp32 logits of the exact products (measured <= 2.4e-7 over 40 seeds),
# so they keep FP32_TOL; the gradients are returned in bf16 (measured <= 2.3e-3, the bf16 rounding of each entry)
BF16_GRAD_TOL = 1e-2


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = random.SystemRandom().randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def make_inputs(n, h, v, *, dtype=torch.float32, logit_scale=5.0, all_negative=False, ignore_rows=(), gen=None):
    """hidden (N, H), weight (V, H) with logits of std ~logit_scale; targets (N,) with some rows = -100."""
    gen = gen if gen is not None else fresh_generator()[0]  # the global RNG would repeat the same draws each run
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (logit_scale / h**0.5)
    if all_negative:  # h >= 0 and w <= 0 make every logit negative
        hidden, weight = hidden.abs(), -weight.abs()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[list(ignore_rows)] = -100
    return (hidden.to(dtype).to(DEVICE).requires_grad_(), weight.to(dtype).to(DEVICE).requires_grad_(),
            targets.to(DEVICE))


def reference(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """float64 logp and entropy from the same (upcast) inputs, with their own autograd graph."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logprobs = torch.log_softmax(h @ w.T / temperature, dim=-1)  # (N, V) float64
    valid = targets != ignore_index
    logp = logprobs.gather(1, targets.clamp_min(0)[:, None]).squeeze(1) * valid
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return h, w, logp, entropy


def rel_err(got, ref) -> float:
    ref = ref.detach()
    return float((got.detach().double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_against_reference(impl, hidden, weight, targets, tol, seed, temperature=1.0, chunk_size=None, grad_tol=None):
    """logp and entropy within tol of float64, both gradients (of a random mix of logp and entropy) within grad_tol
    (default: tol)."""
    grad_tol = tol if grad_tol is None else grad_tol
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature, with_entropy=True, impl=impl,
                                   chunk_size=chunk_size)
    h64, w64, logp64, entropy64 = reference(hidden, weight, targets, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    assert rel_err(logp, logp64) <= tol, f"logp rel err {rel_err(logp, logp64):.2e} (seed {seed})"
    assert rel_err(entropy, entropy64) <= tol, f"entropy rel err {rel_err(entropy, entropy64):.2e} (seed {seed})"
    g = torch.randn_like(logp64)
    g_h = torch.randn_like(logp64)
    ((logp * g.float()).sum() + (entropy * g_h.float()).sum()).backward()
    ((logp64 * g).sum() + (entropy64 * g_h).sum()).backward()
    d_hidden, d_weight = rel_err(hidden.grad, h64.grad), rel_err(weight.grad, w64.grad)
    assert d_hidden <= grad_tol, f"d hidden rel err {d_hidden:.2e} (seed {seed})"
    assert d_weight <= grad_tol, f"d weight rel err {d_weight:.2e} (seed {seed})"


# ---- agreement with float64 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_fp32_matches_float64_at_small_vocab_with_tail_chunk(impl):
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(37, 24, 1000, gen=gen)
    check_against_reference(impl, hidden, weight, targets, FP32_TOL, seed, chunk_size=16)  # 37 = 2*16 + 5


# not "naive": one fp32 matmul summing over all V misses 1e-5 on the hidden gradient (see kernels/chunked.py)
@pytest.mark.parametrize("vocab", [50257, 151936])
@pytest.mark.parametrize("impl", ["torch"])
def test_fp32_matches_float64_at_gpt2_and_qwen3_vocab(impl, vocab):
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(7, 8, vocab, gen=gen)
    check_against_reference(impl, hidden, weight, targets, FP32_TOL, seed, chunk_size=3)  # 7 = 2*3 + 1


@pytest.mark.parametrize("temperature", [0.6, 1.7])
@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_temperature_divides_the_logits(impl, temperature):
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(21, 16, 999, gen=gen)
    check_against_reference(impl, hidden, weight, targets, FP32_TOL, seed, temperature=temperature, chunk_size=8)


@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_all_negative_logits_are_exact_and_finite(impl):
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(19, 16, 1000, all_negative=True, logit_scale=3.0, gen=gen)
    assert float((hidden @ weight.T).detach().max()) < 0  # the case being tested
    check_against_reference(impl, hidden, weight, targets, FP32_TOL, seed, chunk_size=8)


# not "naive": it rounds the logits and their gradient to bf16 (as most stacks do): logp ~1e-3, entropy ~1e-2 off
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16_inputs_match_float64_of_the_upcast_inputs(impl):
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(33, 32, 1000, dtype=torch.bfloat16, gen=gen)
    check_against_reference(impl, hidden, weight, targets, FP32_TOL, seed, chunk_size=16, grad_tol=BF16_GRAD_TOL)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16


def test_bf16_at_qwen3_vocab():
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(5, 8, 151936, dtype=torch.bfloat16, gen=gen)
    check_against_reference("torch", hidden, weight, targets, FP32_TOL, seed, chunk_size=2, grad_tol=BF16_GRAD_TOL)


# ---- ignore_index ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_strided_targets_give_the_same_log_probs_as_contiguous_ones(impl):
    """A strided view of targets (a column of a (N, 2) tensor) reached the Triton kernels, which read unit stride."""
    gen, _ = fresh_generator()
    hidden, weight, targets = make_inputs(10, 8, 50, gen=gen)
    strided = torch.stack([targets.flip(0), targets], dim=1)[:, 1]  # stride (2,): the same ids, not contiguous
    assert not strided.is_contiguous()
    logp, _ = token_logprobs(hidden, weight, strided, impl=impl)
    ref, _ = token_logprobs(hidden, weight, targets.contiguous(), impl=impl)
    torch.testing.assert_close(logp, ref, rtol=0, atol=0)
    total, _ = weighted_logprob_sum(hidden, weight, strided, torch.full((10,), -0.1), impl=impl)
    torch.testing.assert_close(total, -0.1 * ref.sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_ignored_rows_give_zero_and_pass_no_gradient(impl):
    gen, seed = fresh_generator()
    ignored = [0, 3, 4, 10]
    hidden, weight, targets = make_inputs(12, 16, 500, ignore_rows=ignored, gen=gen)
    check_against_reference(impl, hidden, weight, targets, FP32_TOL, seed, chunk_size=4)
    logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, impl=impl)
    assert torch.all(logp[ignored] == 0) and torch.all(entropy[ignored] == 0)
    assert torch.all(hidden.grad[ignored] == 0)


@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_all_rows_ignored_gives_zeros_and_a_zero_gradient(impl):
    hidden, weight, targets = make_inputs(6, 8, 100, ignore_rows=range(6))
    logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, impl=impl)
    assert torch.all(logp == 0) and torch.all(entropy == 0)
    (logp.sum() + entropy.sum()).backward()  # a loss over only masked tokens must still backpropagate
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_custom_ignore_index():
    hidden, weight, targets = make_inputs(5, 8, 50)
    targets = torch.tensor([1, 2, 7, 3, 4], device=DEVICE)  # 7 only in row 2
    logp, _ = token_logprobs(hidden, weight, targets, ignore_index=7, impl="torch")
    assert logp[2] == 0 and torch.all(logp[[0, 1, 3, 4]] < 0)


# ---- extreme scale: fp32 cannot reach 1e-5, but must stay sane and as good as naive ---------------------------------

EXTREME_IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("impl", EXTREME_IMPLS)
def test_extreme_logits_stay_finite_with_the_right_signs(impl):
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(24, 32, 700, logit_scale=5e3, gen=gen)  # |logit| up to ~1e4
    logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, impl=impl, chunk_size=8)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all(), f"seed {seed}"
    assert (logp <= 0).all() and (entropy >= 0).all(), f"seed {seed}"
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all(), f"seed {seed}"


@pytest.mark.parametrize("impl", EXTREME_IMPLS)
def test_extreme_logits_no_less_accurate_than_naive(impl):
    # Integer inputs make every fp32 logit exact (|z| < 2^24), so the only error left is each implementation's
    # softmax arithmetic; with float inputs the logit rounding (~eps |z| ~ 1e-3) would swamp the comparison.
    gen, seed = fresh_generator()
    n, h, v = 40, 16, 700
    hidden = torch.randint(-100, 101, (n, h), generator=gen).float().to(DEVICE)
    weight = torch.randint(-25, 26, (v, h), generator=gen).float().to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    assert float((hidden @ weight.T).abs().max()) > 5e3  # the case being tested
    _, _, logp64, entropy64 = reference(hidden, weight, targets)
    logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, impl=impl, chunk_size=8)
    naive_logp, naive_entropy = token_logprobs(hidden, weight, targets, with_entropy=True, impl="naive")
    for name, got, base, ref in (("logp", logp, naive_logp, logp64), ("entropy", entropy, naive_entropy, entropy64)):
        ref = ref.detach()
        err, naive_err = float((got.double() - ref).norm()), float((base.double() - ref).norm())
        # 1e-6 absolute floor: a few fp32 roundings of O(1) quantities such as log s
        assert err <= naive_err + 1e-6, f"{name}: error {err:.3e} vs naive {naive_err:.3e} (seed {seed})"


@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_logp_never_positive_when_one_token_dominates(impl):
    # a near-one-hot softmax is where rounding pushed other stacks' logp above 0
    hidden, weight, targets = make_inputs(16, 8, 300, logit_scale=50.0)
    targets = (hidden @ weight.T).detach().argmax(dim=1)
    logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, impl=impl)
    assert (logp <= 0).all() and (entropy >= 0).all()


# ---- autograd plumbing ----------------------------------------------------------------------------------------------

def test_no_grad_path_matches_and_builds_no_graph():
    hidden, weight, targets = make_inputs(9, 8, 333)
    with torch.no_grad():
        logp_ng, entropy_ng = token_logprobs(hidden, weight, targets, with_entropy=True, impl="torch")
    logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, impl="torch")
    assert logp_ng.grad_fn is None and entropy_ng.grad_fn is None
    assert logp.grad_fn is not None
    assert torch.equal(logp_ng, logp)
    assert torch.equal(entropy_ng, entropy)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_backward_saves_only_inputs_and_lse(impl):
    hidden, weight, targets = make_inputs(40, 16, 2000)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = token_logprobs(hidden, weight, targets, impl=impl, chunk_size=8)
    n, v = 40, 2000
    assert sum(saved) <= hidden.numel() + weight.numel() + targets.numel() + n  # no (N, V) tensor kept
    assert max(saved) < n * v


@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_gradient_through_entropy_alone_and_logp_alone(impl):
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(10, 8, 120, gen=gen)
    h64, w64, logp64, entropy64 = reference(hidden, weight, targets)
    _, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, impl=impl)
    entropy.sum().backward()
    entropy64.sum().backward()
    assert rel_err(hidden.grad, h64.grad) <= FP32_TOL, f"seed {seed}"
    hidden.grad = weight.grad = h64.grad = w64.grad = None
    logp, _ = token_logprobs(hidden, weight, targets, with_entropy=True, impl=impl)
    logp.sum().backward()
    h64, w64, logp64, _ = reference(hidden, weight, targets)
    logp64.sum().backward()
    assert rel_err(weight.grad, w64.grad) <= FP32_TOL, f"seed {seed}"


def test_frozen_head_gets_no_weight_gradient():
    hidden, weight, targets = make_inputs(6, 8, 64)
    weight.requires_grad_(False)
    logp, _ = token_logprobs(hidden, weight, targets, impl="torch")
    logp.sum().backward()
    assert weight.grad is None and hidden.grad is not None


def test_auto_on_cpu_is_the_torch_path():
    if torch.cuda.is_available():
        pytest.skip("auto picks Triton on CUDA")
    hidden, weight, targets = make_inputs(9, 8, 100)
    logp_auto, _ = token_logprobs(hidden, weight, targets)
    logp_torch, _ = token_logprobs(hidden, weight, targets, impl="torch")
    assert torch.equal(logp_auto, logp_torch)


def test_int32_targets_are_accepted():
    hidden, weight, targets = make_inputs(4, 8, 30)
    logp32, _ = token_logprobs(hidden, weight, targets.int(), impl="torch")
    logp64, _ = token_logprobs(hidden, weight, targets, impl="torch")
    assert torch.equal(logp32, logp64)


# ---- bad input -----------------------------------------------------------------------------------------------------

def test_out_of_range_target_names_the_row():
    hidden, weight, targets = make_inputs(4, 8, 30)
    targets[2] = 30
    with pytest.raises(ValueError, match=r"targets\[2\] = 30 is outside \[0, 30\)"):
        token_logprobs(hidden, weight, targets)


@pytest.mark.parametrize("kwargs, message", [
    (dict(impl="cuda"), "impl must be one of"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
])
def test_bad_options_are_named(kwargs, message):
    hidden, weight, targets = make_inputs(4, 8, 30)
    with pytest.raises(ValueError, match=message):
        token_logprobs(hidden, weight, targets, **kwargs)


def test_shape_mismatch_is_named():
    hidden, weight, targets = make_inputs(4, 8, 30)
    with pytest.raises(ValueError, match="disagree on H"):
        token_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="targets must be 1-D"):
        token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="share one floating dtype"):
        token_logprobs(hidden, weight.double(), targets)


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-27) --------------------------------

def test_no_grad_paths_apply_the_temperature_like_the_grad_paths():
    """RL's old log-probs run without grad: a no-grad path that dropped the temperature broke every GSPO ratio."""
    hidden, weight, targets = make_inputs(6, 8, 50)
    weights = torch.full((6,), -0.25, device=DEVICE)
    with_grad, _ = token_logprobs(hidden, weight, targets, temperature=2.0, impl="torch")
    total_grad, _ = weighted_logprob_sum(hidden, weight, targets, weights, temperature=2.0, impl="torch")
    with torch.no_grad():
        without, _ = token_logprobs(hidden, weight, targets, temperature=2.0, impl="torch")
        total, _ = weighted_logprob_sum(hidden, weight, targets, weights, temperature=2.0, impl="torch")
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, total_grad.detach(), rtol=1e-6, atol=1e-6)


def test_weighted_sum_honours_a_custom_ignore_index():
    hidden, weight, _ = make_inputs(5, 8, 50)
    targets = torch.tensor([1, 0, 7, 3, 4], device=DEVICE)  # 0 is a real id; ignore_index=7 drops row 2 only
    weights = torch.ones(5, device=DEVICE)
    total, logp = weighted_logprob_sum(hidden, weight, targets, weights, ignore_index=7, impl="torch")
    ref, _ = token_logprobs(hidden, weight, targets, ignore_index=7, impl="torch")
    assert logp[2] == 0 and total.item() == pytest.approx(ref.sum().item(), rel=1e-6)
