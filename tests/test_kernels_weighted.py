"""weighted_logprob_sum (the SFT loss path: gradients formed in the forward) against a float64 reference, and
the model / SFT step built on it against the plain token_logprobs path."""
import pytest
import torch

from minitagpr.kernels import token_logprobs, weighted_logprob_sum
from test_kernels import DEVICE, FP32_TOL, SMALL_IMPLS, fresh_generator, make_inputs, needs_triton, reference, rel_err


def check_weighted(hidden, weight, targets, seed, temperature=1.0, chunk_size=None, impl="torch"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(targets.shape[0], generator=gen, dtype=torch.float64)  # any sign, any size
    total, logp = weighted_logprob_sum(hidden, weight, targets, w.float().to(DEVICE), temperature=temperature,
                                       chunk_size=chunk_size, impl=impl)
    h64, w64, logp64, _ = reference(hidden, weight, targets, temperature)
    total64 = (w.to(DEVICE) * logp64).sum()
    assert logp.dtype == total.dtype == torch.float32 and logp.grad_fn is None
    assert rel_err(logp, logp64) <= FP32_TOL, f"logp (seed {seed})"
    # relative to the sum of |terms|, not |total|: random signs can cancel the total down to ~0, and an fp32 sum's
    # error scales with the terms it adds (it failed ~1 run in 20 when measured against |total|)
    size = (w.to(DEVICE) * logp64).abs().sum().item()
    assert abs(total.item() - total64.item()) <= FP32_TOL * max(1.0, size), f"total (seed {seed})"
    scale = 0.37  # an outer factor: the backward must scale the stored gradients by it
    (scale * total).backward()
    (scale * total64).backward()
    assert rel_err(hidden.grad, h64.grad) <= FP32_TOL, f"d hidden {rel_err(hidden.grad, h64.grad):.2e} (seed {seed})"
    assert rel_err(weight.grad, w64.grad) <= FP32_TOL, f"d weight {rel_err(weight.grad, w64.grad):.2e} (seed {seed})"


@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_matches_float64_with_ignored_rows_and_a_tail_chunk(impl):
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(37, 24, 1000, ignore_rows=(0, 5, 36), gen=gen)
    check_weighted(hidden, weight, targets, seed, chunk_size=16, impl=impl)


@pytest.mark.parametrize("impl", SMALL_IMPLS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(temperature, impl):
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(21, 16, 999, gen=gen)
    check_weighted(hidden, weight, targets, seed, temperature=temperature, chunk_size=8, impl=impl)


def test_auto_is_triton_on_cuda_and_torch_elsewhere(monkeypatch):
    import minitagpr.kernels.logprob as K

    picked = []
    real = K._dispatch
    monkeypatch.setattr(K, "_dispatch", lambda *a: picked.append(a[5]) or real(*a))
    hidden, weight, targets = make_inputs(6, 8, 40)
    weighted_logprob_sum(hidden, weight, targets, torch.ones(6, device=DEVICE))
    expected = "triton" if torch.cuda.is_available() and K.triton_available() else None  # torch: no _dispatch
    assert picked == ([expected] if expected else [])


def test_qwen3_vocab():
    gen, seed = fresh_generator()
    hidden, weight, targets = make_inputs(7, 8, 151936, gen=gen)
    check_weighted(hidden, weight, targets, seed, chunk_size=3)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_same_numbers_as_token_logprobs(impl):
    # each path against token_logprobs of the same impl: bit-equal log-probs (on CUDA "auto" is triton, whose
    # reductions differ in the last bits from the chunked torch path: the first GPU run compared across impls)
    hidden, weight, targets = make_inputs(30, 16, 500, ignore_rows=(3, 4))
    w = -torch.rand(30, device=DEVICE)
    total, logp = weighted_logprob_sum(hidden, weight, targets, w, chunk_size=7, impl=impl)
    logp_ref, _ = token_logprobs(hidden, weight, targets, chunk_size=7, impl=impl)
    assert torch.equal(logp, logp_ref.detach())
    total.backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logp_ref, _ = token_logprobs(hidden, weight, targets, chunk_size=7, impl=impl)
    (w * logp_ref).sum().backward()
    assert rel_err(g_h, hidden.grad.double()) <= 1e-6 and rel_err(g_w, weight.grad.double()) <= 1e-6


def test_no_grad_and_frozen_head_and_all_ignored():
    hidden, weight, targets = make_inputs(9, 8, 100)
    w = torch.ones(9, device=DEVICE)
    with torch.no_grad():
        total_ng, logp_ng = weighted_logprob_sum(hidden, weight, targets, w)
    total, logp = weighted_logprob_sum(hidden, weight, targets, w)
    assert total_ng.grad_fn is None and total.grad_fn is not None and torch.equal(logp_ng, logp)
    weight.requires_grad_(False)
    weighted_logprob_sum(hidden, weight, targets, w)[0].backward()
    assert weight.grad is None and hidden.grad is not None
    hidden.grad = None
    targets[:] = -100
    total, logp = weighted_logprob_sum(hidden, weight, targets, w)
    total.backward()
    assert total.item() == 0.0 and torch.equal(logp, torch.zeros(9, device=DEVICE))
    assert torch.equal(hidden.grad, torch.zeros(9, 8, device=DEVICE))


@pytest.mark.parametrize("impl", SMALL_IMPLS)
def test_token_weights_that_require_grad_get_logp_as_their_gradient(impl):
    """L is linear in the weights, so dL/dw_t = logp_t (0 for an ignored row); the torch path dropped it silently
    (pinned 2026-11-29)."""
    gen, _ = fresh_generator()
    hidden, weight, targets = make_inputs(19, 16, 300, ignore_rows=(3,), gen=gen)
    w = torch.randn(19, generator=gen).to(DEVICE).requires_grad_()
    total, logp = weighted_logprob_sum(hidden, weight, targets, w, impl=impl, chunk_size=8)
    (0.5 * total).backward()
    assert w.grad is not None and w.grad.dtype == w.dtype
    torch.testing.assert_close(w.grad, 0.5 * logp, rtol=0, atol=1e-7)
    assert w.grad[3].item() == 0.0


def test_second_backward_is_refused():
    # the chunked torch path frees the gradients it formed in the forward after one backward ("auto" picks it off
    # CUDA; on CUDA it picks triton, plain autograd, where a retained graph may be backpropagated again)
    hidden, weight, targets = make_inputs(5, 8, 50)
    total, _ = weighted_logprob_sum(hidden, weight, targets, torch.ones(5, device=DEVICE), impl="torch")
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        total.backward()


def test_bad_weights_and_impl_are_named():
    hidden, weight, targets = make_inputs(4, 8, 30)
    with pytest.raises(ValueError, match=r"token_weights must be a float tensor of shape \(4,\)"):
        weighted_logprob_sum(hidden, weight, targets, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="token_weights must be a float tensor"):
        weighted_logprob_sum(hidden, weight, targets, torch.ones(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="impl must be one of"):
        weighted_logprob_sum(hidden, weight, targets, torch.ones(4, device=DEVICE), impl="cuda")
    targets[1] = 99
    with pytest.raises(ValueError, match=r"targets\[1\] = 99 is outside"):
        weighted_logprob_sum(hidden, weight, targets, torch.ones(4, device=DEVICE))


def test_sft_step_gradients_equal_the_plain_logprob_path():
    """nll_forward_backward (weighted path, tied head) == -mean logp through token_logprobs, parameter by parameter."""
    from minitagpr.model.presets import build_model, tiny_config
    from minitagpr.train.loss import nll_forward_backward

    model = build_model(tiny_config("tiny"), seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (2, 3, 17), generator=g)
    mbs = []
    for i in range(2):
        targets = torch.roll(ids[i], -1, dims=1)
        targets[:, :5] = -100  # a masked prompt
        targets[:, -1] = -100
        mbs.append({"input_ids": ids[i], "position_ids": torch.arange(17).expand(3, 17), "targets": targets})
    out = nll_forward_backward(model, mbs, "cpu", step=0)
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    n = sum(int((mb["targets"] != -100).sum()) for mb in mbs)
    total = 0.0
    for mb in mbs:
        logp, _ = model(mb["input_ids"], mb["position_ids"], targets=mb["targets"])
        (-logp.sum() / n).backward()
        total += -float(logp.detach().sum())
    assert abs(out["loss"] - total / n) <= 1e-5 * abs(total / n)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
