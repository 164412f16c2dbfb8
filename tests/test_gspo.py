"""GSPO math (minitagpr.rl.gspo): group advantages and the clipped sequence-ratio loss against float64 hand
implementations."""
import math

import pytest
import torch

from minitagpr.rl.gspo import advantage_correlations, group_advantage_metrics, group_advantages, gspo_loss

EPS_LOW, EPS_HIGH = 3e-4, 4e-4


# --- hand implementations (float64, one sequence at a time) -------------------------------------------------------
def hand_loss_and_grad(logp, old_logp, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, num_sequences=None):
    """-(1/N) sum_i min(s_i A_i, clip(s_i) A_i) and its gradient wrt logp, written out per sequence:
    d loss / d logp_it = -(1/N) * A_i * s_i / |y_i| where the unclipped branch is the minimum, else 0."""
    B, T = logp.shape
    rows = [[t for t in range(T) if mask[i, t]] for i in range(B)]
    count = num_sequences if num_sequences is not None else sum(1 for r in rows if r)
    total, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for i, tokens in enumerate(rows):
        if not tokens:
            continue
        log_s = sum(float(logp[i, t]) - float(old_logp[i, t]) for t in tokens) / len(tokens)
        s, a = math.exp(log_s), float(adv[i])
        clipped_s = min(max(s, 1 - eps_low), 1 + eps_high)
        total += min(s * a, clipped_s * a)
        unclipped_is_min = (a > 0 and s <= 1 + eps_high) or (a < 0 and s >= 1 - eps_low)
        if unclipped_is_min:
            for t in tokens:
                grad[i, t] = -a * s / len(tokens) / count
    return -total / count, grad


def random_batch(B=6, T=9, dtype=torch.float32, spread=1e-3, seed=0, garbage=True):
    """Log-probs near their old values (ratios within ~1e-3 of 1, so some clip and some do not), ragged masks
    with one empty row, and padding filled with values that must never be read."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # (B, T)
    logp = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)  # (B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0  # an empty response
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T) right padding
    adv = torch.randn(B, generator=g, dtype=torch.float64)  # (B,)
    if garbage:
        logp = torch.where(mask, logp, torch.tensor(float("nan"), dtype=torch.float64))
        old = torch.where(mask, old, torch.tensor(float("-inf"), dtype=torch.float64))
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def loss_and_grad(logp, old, adv, mask, **kw):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = gspo_loss(logp, old, adv, mask, **kw)
    loss.backward()
    return loss.detach(), logp.grad, metrics


# --- the loss ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_equal_the_float64_hand_implementation(token_level, dtype, tol, seed):
    logp, old, adv, mask = random_batch(dtype=dtype, seed=seed)
    loss, grad, _ = loss_and_grad(logp, old, adv, mask, token_level=token_level)
    ref_loss, ref_grad = hand_loss_and_grad(logp.double(), old.double(), adv.double(), mask)
    assert abs(loss.item() - ref_loss) <= tol
    assert torch.allclose(grad.double(), ref_grad, atol=tol, rtol=0)


@pytest.mark.parametrize("token_level", [False, True])
def test_bf16_log_probs_are_computed_in_float32(token_level):
    """bf16 resolves 2^-7 near 1, wider than the clip band: computed in bf16 every ratio would read 1 and nothing
    would clip. Given bf16 log-probs, the loss must be that of their float values, and its gradient reach them."""
    logp, old, adv, mask = random_batch(dtype=torch.float64, spread=2e-3, seed=3, garbage=False)
    logp, old, adv = logp.to(torch.bfloat16), old.to(torch.bfloat16), adv.to(torch.bfloat16)
    loss, grad, metrics = loss_and_grad(logp, old, adv, mask, token_level=token_level)
    ref_loss, ref_grad = hand_loss_and_grad(logp.double(), old.double(), adv.double(), mask)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref_loss) <= 1e-6
    assert torch.allclose(grad.double(), ref_grad, atol=1e-2 * ref_grad.abs().max().item(), rtol=0)  # bf16 grad
    assert metrics["ratio_min"] < 1 - EPS_LOW and metrics["ratio_max"] > 1 + EPS_HIGH
    assert metrics["clip_frac_low"] + metrics["clip_frac_high"] > 0


def test_random_batches_exercise_both_clipped_and_unclipped_sequences():
    _, _, metrics = loss_and_grad(*random_batch(B=40, seed=3))
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 1


def test_padding_values_and_amount_do_not_change_loss_or_gradient():
    logp, old, adv, mask = random_batch(garbage=False)
    loss, grad, _ = loss_and_grad(logp, old, adv, mask)
    B, T = logp.shape
    pad = 5
    wide = lambda x, fill: torch.cat([x, torch.full((B, pad), fill, dtype=x.dtype)], dim=1)  # noqa: E731
    loss_wide, grad_wide, _ = loss_and_grad(wide(logp, float("inf")), wide(old, float("nan")), adv,
                                            torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], dim=1))
    assert loss_wide.item() == pytest.approx(loss.item(), abs=1e-7)
    assert torch.allclose(grad_wide[:, :T], grad) and not grad_wide[:, T:].any()


def test_left_padding_gives_the_same_loss_as_right_padding():
    logp, old, adv, mask = random_batch(garbage=False)
    # roll each row so its tokens end at the last column
    shift = (mask.shape[1] - mask.sum(1)).tolist()
    left = lambda x: torch.stack([torch.roll(row, k) for row, k in zip(x, shift)])  # noqa: E731
    loss, _, _ = loss_and_grad(logp, old, adv, mask)
    loss_left, _, _ = loss_and_grad(left(logp), left(old), adv, left(mask))
    assert loss_left.item() == pytest.approx(loss.item(), abs=1e-7)


def test_ratio_one_gives_the_plain_policy_gradient():
    logp, _, adv, mask = random_batch(garbage=False, dtype=torch.float64)
    loss, grad, metrics = loss_and_grad(logp, logp.clone(), adv, mask)
    nonempty = mask.any(1)
    n = nonempty.sum()
    # J = mean_i A_i, and d(-J)/d logp_it = -A_i / (|y_i| * N): the length-normalised REINFORCE gradient
    assert loss.item() == pytest.approx(-(adv[nonempty].sum() / n).item(), abs=1e-12)
    expected = -(adv / mask.sum(1).clamp(min=1) / n).unsqueeze(1) * mask
    assert torch.allclose(grad, expected, atol=1e-12)
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0 and metrics["approx_kl"] == 0.0
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0.0


def crafted(ratios, advs, lengths=(3, 3, 3, 3)):
    """Sequences whose every token has log-ratio log(ratio), so s_i = ratio exactly."""
    T = max(lengths)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # (B, T)
    old = torch.full(mask.shape, -1.0, dtype=torch.float64)
    logp = old + torch.tensor(ratios, dtype=torch.float64).log().unsqueeze(1)
    return logp, old, torch.tensor(advs, dtype=torch.float64), mask


def test_clipping_on_crafted_ratios():
    # high clip binds (A > 0, s > 1 + eps_high); low clip binds (A < 0, s < 1 - eps_low);
    # the other two take the pessimistic unclipped value and keep their gradient.
    logp, old, adv, mask = crafted([1.01, 0.99, 0.99, 1.01], [1.0, -1.0, 1.0, -1.0])
    loss, grad, metrics = loss_and_grad(logp, old, adv, mask)
    objectives = [(1 + EPS_HIGH) * 1.0, (1 - EPS_LOW) * -1.0, 0.99 * 1.0, 1.01 * -1.0]
    assert loss.item() == pytest.approx(-sum(objectives) / 4, abs=1e-12)
    assert not grad[0].any() and not grad[1].any()
    assert torch.allclose(grad[2], torch.full((3,), -0.99 / 3 / 4, dtype=torch.float64))
    assert torch.allclose(grad[3], torch.full((3,), 1.01 / 3 / 4, dtype=torch.float64))
    assert metrics["clip_frac_low"] == 0.25 and metrics["clip_frac_high"] == 0.25
    assert metrics["ratio_min"] == pytest.approx(0.99) and metrics["ratio_max"] == pytest.approx(1.01)
    assert metrics["ratio_mean"] == pytest.approx(1.0)


def test_ratio_inside_the_clip_range_is_not_clipped():
    logp, old, adv, mask = crafted([1.0002, 0.9998], [1.0, -1.0], lengths=(2, 5))
    loss, grad, metrics = loss_and_grad(logp, old, adv, mask)
    assert loss.item() == pytest.approx(-(1.0002 - 0.9998) / 2, abs=1e-12)
    assert grad[0, :2].tolist() == pytest.approx([-1.0002 / 2 / 2] * 2)
    assert grad[1, :5].tolist() == pytest.approx([0.9998 / 5 / 2] * 5)  # A < 0: the sign flips, 1/length per token
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0.0


def test_each_sequence_weighs_the_same_whatever_its_length():
    # equal ratios, opposite advantages: sequence-level averaging cancels; a token-level mean would not
    logp, old, adv, mask = crafted([1.0001, 1.0001], [1.0, -1.0], lengths=(1, 50))
    loss, _, _ = loss_and_grad(logp, old, adv, mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)


def test_an_empty_response_contributes_nothing():
    logp, old, adv, mask = random_batch(garbage=False)
    keep = mask.any(1)
    loss, _, metrics = loss_and_grad(logp, old, adv, mask)
    loss_kept, _, _ = loss_and_grad(logp[keep], old[keep], adv[keep], mask[keep])
    assert loss.item() == pytest.approx(loss_kept.item(), abs=1e-7)
    assert metrics["empty_sequences"] == 1.0 and metrics["num_sequences"] == float(keep.sum())


def test_all_empty_batch_gives_zero_loss_that_backpropagates():
    logp, old, adv, mask = random_batch()
    loss, grad, metrics = loss_and_grad(logp, old, adv, torch.zeros_like(mask))
    assert loss.item() == 0.0 and not grad.any() and metrics["num_sequences"] == 0.0


def test_token_level_equals_sequence_level_in_value_and_gradient():
    logp, old, adv, mask = random_batch(dtype=torch.float64, seed=5)
    loss_seq, grad_seq, _ = loss_and_grad(logp, old, adv, mask)
    loss_tok, grad_tok, _ = loss_and_grad(logp, old, adv, mask, token_level=True)
    assert loss_tok.item() == pytest.approx(loss_seq.item(), abs=1e-12)
    assert torch.allclose(grad_tok, grad_seq, atol=1e-12)


def test_shards_with_the_global_count_sum_to_the_full_batch():
    # what two ranks (or two micro-batches) do: each divides by the global count, gradients are summed
    logp, old, adv, mask = random_batch(B=8, dtype=torch.float64, seed=7)
    loss, grad, _ = loss_and_grad(logp, old, adv, mask)
    n = int(mask.any(1).sum())
    halves = [slice(0, 3), slice(3, 8)]
    parts = [loss_and_grad(logp[h], old[h], adv[h], mask[h], num_sequences=n) for h in halves]
    assert sum(p[0].item() for p in parts) == pytest.approx(loss.item(), abs=1e-12)
    assert torch.allclose(torch.cat([p[1] for p in parts]), grad, atol=1e-12)


def test_metrics_are_python_floats_with_hand_values():
    logp, old, adv, mask = crafted([1.01, 0.99], [2.0, -1.0], lengths=(1, 3))
    _, _, metrics = loss_and_grad(logp, old, adv, mask)
    assert all(type(v) is float for v in metrics.values())
    k3 = lambda r: r - 1 - math.log(r)  # noqa: E731
    assert metrics["approx_kl"] == pytest.approx((k3(1.01) + 3 * k3(0.99)) / 4)
    assert (metrics["adv_mean"], metrics["adv_min"], metrics["adv_max"]) == (0.5, -1.0, 2.0)
    assert metrics["adv_std"] == pytest.approx(1.5) and metrics["num_tokens"] == 4.0


def test_old_logp_and_advantages_get_no_gradient():
    logp, old, adv, mask = random_batch(garbage=False)
    old.requires_grad_(True)
    adv.requires_grad_(True)
    loss, _ = gspo_loss(logp.requires_grad_(True), old, adv, mask)
    loss.backward()
    assert old.grad is None and adv.grad is None


@pytest.mark.parametrize("shapes,match", [
    (((2, 3), (2, 4), (2,), (2, 3)), "share a"),
    (((2, 3), (2, 3), (3,), (2, 3)), "advantages"),
    (((6,), (6,), (1,), (6,)), "share a"),
])
def test_bad_shapes_are_errors_naming_them(shapes, match):
    lp, old, adv, mask = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        gspo_loss(lp, old, adv, mask.bool())


# --- group advantages -----------------------------------------------------------------------------------------------
def test_group_advantages_by_hand_with_biased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])  # groups of 4
    # group 1: mean 0.5, population std 0.5; group 2: mean 2, population std sqrt(0.5)
    expected = [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)] * 2
    expected = [expected[0], expected[1], expected[1], expected[0]] + [
        x / (math.sqrt(0.5) + 1e-6) for x in (1.0, -1.0, 0.0, 0.0)]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-7)


def test_group_advantages_have_unit_mean_square_per_group():
    rewards = torch.randn(5 * 7, generator=torch.Generator().manual_seed(0))
    adv = group_advantages(rewards, 5, eps=0.0).view(7, 5)
    assert torch.allclose(adv.mean(1), torch.zeros(7), atol=1e-6)
    assert torch.allclose(adv.pow(2).mean(1), torch.ones(7), atol=1e-5)


def test_zero_variance_group_gets_exactly_zero_and_is_counted():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    adv = group_advantages(rewards, 5)
    assert adv[:5].tolist() == [0.0] * 5 and adv[5:].abs().sum() > 0
    metrics = group_advantage_metrics(rewards, 5)
    assert metrics["zero_variance_groups"] == 1.0 and metrics["zero_variance_share"] == 0.5


def test_group_advantages_keep_float64_and_return_float32_otherwise():
    assert group_advantages(torch.tensor([1.0, 2.0], dtype=torch.float64), 2).dtype == torch.float64
    assert group_advantages(torch.tensor([1, 2]), 2).dtype == torch.float32


def test_group_size_must_divide_the_rewards():
    with pytest.raises(ValueError, match="groups of group_size=4"):
        group_advantages(torch.zeros(10), 4)


def test_non_finite_reward_is_an_error_naming_prompt_and_sample():
    rewards = torch.zeros(10)
    rewards[7] = float("nan")
    with pytest.raises(ValueError, match=r"index 7 \(prompt 1, sample 2\)"):
        group_advantages(rewards, 5)


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-27) ----------------------------------

def test_clip_fractions_count_the_side_where_the_clip_binds():
    mask = torch.ones(4, 2, dtype=torch.bool)
    old = torch.zeros(4, 2, dtype=torch.float64)
    logp = torch.tensor([-0.01, 0.01, -0.01, 0.01], dtype=torch.float64).unsqueeze(1).expand(4, 2).contiguous()
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=torch.float64)  # s < low with A < 0; s > high with A > 0; ...
    _, m = gspo_loss(logp, old, adv, mask)
    assert m["clip_frac_low"] == 0.25 and m["clip_frac_high"] == 0.25  # ... and the two rows where it does not bind
    _, m = gspo_loss(logp[:1], old[:1], adv[:1], mask[:1])
    assert m["clip_frac_low"] == 1.0 and m["clip_frac_high"] == 0.0


@pytest.mark.parametrize("value", [0.7, 0.1])
def test_a_group_of_equal_rewards_has_advantages_exactly_zero(value):
    """Three copies of 0.7 (or 0.1) have a float64 mean off by one ulp: (r - mean) / (0 + eps) would be 1e-10 noise
    (five copies happen to be exact, so the G = 5 tests above could not tell)."""
    rewards = torch.tensor([value] * 3 + [0.0, 1.0, 0.5], dtype=torch.float64)
    adv = group_advantages(rewards, 3)
    assert torch.equal(adv[:3], torch.zeros(3, dtype=torch.float64))
    assert group_advantage_metrics(rewards, 3)["reward_group_std_mean"] == pytest.approx(
        torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64).std(correction=0).item() / 2)  # biased std


def test_ratio_and_advantage_metrics_skip_empty_responses():
    logp = torch.tensor([[0.01, 0.01], [5.0, 5.0]], dtype=torch.float64)
    old = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.tensor([[True, True], [False, False]])  # row 1 is an empty response
    _, m = gspo_loss(logp, old, torch.tensor([1.0, 3.0], dtype=torch.float64), mask)
    assert m["ratio_mean"] == pytest.approx(math.exp(0.01)) and m["adv_sq_mean"] == 1.0 and m["adv_mean"] == 1.0
    assert m["empty_sequences"] == 1.0 and m["num_sequences"] == 1.0


def test_a_zero_clip_range_is_allowed():
    logp = torch.zeros(1, 2, dtype=torch.float64)
    loss, _ = gspo_loss(logp, logp, torch.ones(1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool),
                        eps_low=0.0, eps_high=0.0)
    assert loss.item() == -1.0
    # off-policy (ratio e^0.1 and e^-0.1), the zero-width band acts: A > 0 above 1 and A < 0 below 1 are held at
    # 1 (no gradient); A > 0 below 1 keeps its ratio (min picks the unclipped side)
    logp = torch.tensor([[0.1, 0.1], [-0.1, -0.1], [-0.1, -0.1]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    loss, m = gspo_loss(logp, torch.zeros(3, 2, dtype=torch.float64), adv, torch.ones(3, 2, dtype=torch.bool),
                        eps_low=0.0, eps_high=0.0)
    assert loss.item() == pytest.approx(-(1.0 - 1.0 + math.exp(-0.1)) / 3, abs=1e-12)
    loss.backward()
    assert not logp.grad[0].any() and not logp.grad[1].any() and logp.grad[2].abs().min() > 0
    assert m["clip_frac_high"] == pytest.approx(1 / 3) and m["clip_frac_low"] == pytest.approx(1 / 3)


# ---- how closely the advantages follow each reward term -----------------------------------------------------------

def test_advantage_correlations_by_hand():
    # group 1: tag (0, -0.8, 0, 0) and foundation (0.4, 0.4, 0.2, 0.6); group 2 all equal (no signal: weight 0)
    tag = torch.tensor([0.0, -0.8, 0.0, 0.0, -0.8, -0.8, -0.8, -0.8], dtype=torch.float64)
    found = torch.tensor([0.4, 0.4, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    prmu = torch.full((8,), 0.15, dtype=torch.float64)  # constant within both groups
    r = tag + found + prmu
    corr = advantage_correlations(r, {"foundation": found, "tag": tag, "prmu": prmu}, 4)
    # by hand, group 1 centred: tag (0.2, -0.6, 0.2, 0.2), foundation (0, 0, -0.2, 0.2), r their sum
    # (0.2, -0.6, 0, 0.4); sums of squares r 0.56, tag 0.48, foundation 0.08; r.tag 0.48, r.foundation 0.08
    assert corr["tag"] == pytest.approx(0.48 / math.sqrt(0.56 * 0.48), rel=1e-9)
    assert corr["foundation"] == pytest.approx(0.08 / math.sqrt(0.56 * 0.08), rel=1e-9)
    assert corr["prmu"] == 0.0  # constant in every group: no relation, not NaN
    assert advantage_correlations(r, {"all": r, "against": -r}, 4) == {"all": pytest.approx(1.0),
                                                                       "against": pytest.approx(-1.0)}
    assert advantage_correlations(torch.zeros(8), {"tag": tag}, 4) == {}  # no group with signal
    with pytest.raises(ValueError, match="term 'tag' has shape"):
        advantage_correlations(r, {"tag": tag[:4]}, 4)


def test_advantage_correlations_weigh_groups_by_their_advantages_and_stay_bounded():
    """A group counts by its mean A^2: one per group with signal, whatever its reward spread (pooling covariances
    would weight groups by spread); terms that cancel within a group cannot push the value outside [-1, 1]."""
    a = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # group 1 follows a (spread 1)
    b = torch.tensor([0.0, 0.0, 0.0, 0.01], dtype=torch.float64)  # group 2 follows b (spread 0.01)
    corr = advantage_correlations(a + b, {"a": a, "b": b}, 2)
    assert corr["a"] == pytest.approx(0.5, rel=1e-3) and corr["b"] == pytest.approx(0.5, rel=1e-3)
    # a near-tie: a right answer with bad tags against a wrong one with good tags, told apart by PRMU alone
    found = torch.tensor([0.8, 0.0], dtype=torch.float64)
    tag = torch.tensor([-0.8, 0.0], dtype=torch.float64)
    prmu = torch.tensor([0.102, 0.1], dtype=torch.float64)
    corr = advantage_correlations(found + tag + prmu, {"foundation": found, "tag": tag, "prmu": prmu}, 2)
    assert corr == {"foundation": pytest.approx(1.0), "tag": pytest.approx(-1.0), "prmu": pytest.approx(1.0)}
    # a group whose spread is below eps carries almost no advantage, and almost no weight
    tiny = torch.tensor([0.0, 1e-9, 0.0, 1.0], dtype=torch.float64)
    assert advantage_correlations(tiny, {"x": torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)}, 2)["x"] \
        == pytest.approx(-1.0, abs=0.01)
