"""One optimizer step's pieces: the token-normalised NLL, AdamW groups, warmup + cosine, gradient clipping."""
from __future__ import annotations

import math

import pytest
import torch

from minitagpr.model import presets
from minitagpr.train import optim as O
from minitagpr.train.loss import NonFiniteLossError, nll_forward_backward


def tiny_model(seed=0):
    return presets.build_model(presets.tiny_config("tiny", vocab_size=64), seed=seed)


def random_batch(g, rows, T=12, V=64):
    ids = torch.randint(0, V, (rows, T), generator=g)
    targets = torch.randint(0, V, (rows, T), generator=g)
    targets[torch.rand(rows, T, generator=g) < 0.4] = -100  # ragged masks: rows with few or many targets
    pos = torch.arange(T).expand(rows, T).clone()
    return {"input_ids": ids, "position_ids": pos, "targets": targets}


def reference_mean_nll(model, batch):
    """float64 mean of -log softmax(logits)[target] over valid targets."""
    hidden = model(batch["input_ids"], batch["position_ids"])
    logits = model.logits(hidden).double()  # (B, T, V)
    logp = torch.log_softmax(logits, -1)
    valid = batch["targets"] != -100
    picked = logp.gather(-1, batch["targets"].clamp(min=0)[..., None])[..., 0]
    return -(picked[valid]).sum() / valid.sum()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_loss_is_the_mean_nll_over_valid_tokens_of_the_step():
    g = torch.Generator().manual_seed(0)
    model, batch = tiny_model(), random_batch(g, 4)
    out = nll_forward_backward(model, [batch], "cpu", step=0)
    ref = reference_mean_nll(model, batch)
    assert out["loss"] == pytest.approx(ref.item(), rel=1e-5)
    assert out["valid_tokens"] == int((batch["targets"] != -100).sum())


def test_micro_batches_give_the_gradient_of_one_big_batch():
    g = torch.Generator().manual_seed(1)
    batch = random_batch(g, 4)
    big = tiny_model()
    out_big = nll_forward_backward(big, [batch], "cpu", step=0)
    split = tiny_model()
    micro = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(4)]  # unequal valid counts per micro-batch
    out_split = nll_forward_backward(split, micro, "cpu", step=0)
    assert out_split["loss"] == pytest.approx(out_big["loss"], rel=1e-6)
    gb, gs = grads(big), grads(split)
    for name in gb:
        torch.testing.assert_close(gs[name], gb[name], rtol=1e-5, atol=1e-7)


def test_non_finite_loss_stops_with_the_step_number():
    g = torch.Generator().manual_seed(2)
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 7"):
        nll_forward_backward(model, [random_batch(g, 2)], "cpu", step=7)


def test_batch_without_targets_is_an_error():
    batch = random_batch(torch.Generator().manual_seed(3), 2)
    batch["targets"][:] = -100
    with pytest.raises(ValueError, match="step 4: the global batch holds no target tokens"):
        nll_forward_backward(tiny_model(), [batch], "cpu", step=4)


def test_weight_decay_skips_vectors_and_tied_weights_appear_once():
    model = tiny_model()
    opt = O.build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert all(p.ndim == 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_extra_groups_keep_their_own_lr_through_the_schedule():
    model = tiny_model()
    table = torch.nn.Parameter(torch.zeros(3, 4))
    opt = O.build_optimizer(model, lr=1e-3, extra_groups=[{"params": [table], "lr": 1e-1, "weight_decay": 0.0}])
    O.set_lr(opt, 0.5)
    assert opt.param_groups[-1]["lr"] == pytest.approx(5e-2) and opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    total, warmup, floor = 20, 4, 0.1
    m = [O.lr_at(s, total, warmup, floor) for s in range(total)]
    assert m[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert m[4] == pytest.approx(1.0) and m[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(m[4:], m[5:]))
    # halfway through the decay (progress 0.5) the cosine sits halfway between peak and floor
    assert O.lr_at(7, total_steps=13, warmup_steps=2, min_lr_ratio=floor) == pytest.approx(floor + (1 - floor) / 2)


def test_no_warmup_starts_at_the_peak():
    assert O.lr_at(0, 10, 0) == 1.0


def test_clip_reports_the_total_norm_and_scales_to_max_norm():
    model = tiny_model()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    n = sum(p.numel() for p in model.parameters())
    norm = O.clip_grad_norm(model, max_norm=1.0)
    assert norm == pytest.approx(0.5 * math.sqrt(n), rel=1e-5)
    after = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    assert after.item() == pytest.approx(1.0, rel=1e-4)


def test_clip_zero_only_measures():
    model = tiny_model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    norm = O.clip_grad_norm(model, max_norm=0.0)
    assert norm == pytest.approx(math.sqrt(sum(p.numel() for p in model.parameters())), rel=1e-5)
    assert all(torch.all(p.grad == 1) for p in model.parameters())


def test_packed_rows_give_the_log_probs_of_their_documents_alone():
    """The contract SFT packing relies on (docs/interfaces.md): positions restarting at 0 start a new document that
    attends to nothing before it. Two rows of two documents each, against each document run by itself."""
    g = torch.Generator().manual_seed(4)
    model = tiny_model()
    docs = [torch.randint(0, 64, (n,), generator=g) for n in (5, 7, 4, 8)]
    rows = torch.stack([torch.cat(docs[:2]), torch.cat(docs[2:])])  # (2, 12)
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.cat([torch.arange(4), torch.arange(8)])])
    targets = torch.roll(rows, -1, dims=1)
    with torch.no_grad():
        packed, _ = model(rows, pos, targets=targets)  # (2, 12)
        alone = [model(d[None], targets=torch.roll(d, -1)[None])[0][0] for d in docs]
    # compare every position except each document's last, whose packed target is the next document's first token
    torch.testing.assert_close(packed[0, :4], alone[0][:4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[0, 5:11], alone[1][:6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[1, :3], alone[2][:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[1, 4:11], alone[3][:7], rtol=1e-5, atol=1e-6)


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_the_schedule_stays_at_the_floor_past_the_last_step():
    """A run resumed with more steps under a constant floor must not climb back up the cosine."""
    assert O.lr_at(12, total_steps=10, warmup_steps=2, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_input_tokens_count_every_position_and_targets_only_the_valid_ones():
    from minitagpr import distributed as D
    from minitagpr.train.loss import count_tokens

    D.init_distributed()  # a group of one
    try:
        mb = {"input_ids": torch.zeros(2, 8, dtype=torch.long),
              "targets": torch.tensor([[1] * 3 + [-100] * 5, [1] * 3 + [-100] * 5])}
        valid, tokens = count_tokens([mb], "cpu")
        assert valid.item() == 6 and tokens == 16
    finally:
        D.destroy_distributed()


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -----------------------------------

@pytest.mark.parametrize("step, total, warmup", [(3, 4, 3), (0, 1, 0)])
def test_a_single_step_after_warmup_runs_at_the_peak(step, total, warmup):
    """No room for the cosine: the one step after warmup runs at 1 (the docstring's rule), no division by zero."""
    assert O.lr_at(step, total_steps=total, warmup_steps=warmup) == 1.0


def test_set_lr_scales_the_base_lr_not_the_last_one_and_reports_the_first_group():
    """The schedule sets lr = base_lr * multiplier every step; it must not compound over calls."""
    model = tiny_model()
    table = torch.nn.Parameter(torch.zeros(3, 4))
    opt = O.build_optimizer(model, lr=1e-3, extra_groups=[{"params": [table], "lr": 1e-1}])
    O.set_lr(opt, 0.5)
    assert O.set_lr(opt, 0.5) == pytest.approx(5e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-4, 5e-2])


def test_frozen_parameters_stay_out_of_the_optimizer_and_betas_default_to_0_9_0_95():
    """RL and PRMU training build AdamW with the default betas, the same (0.9, 0.95) SFT's config defaults to."""
    model = tiny_model()
    frozen = next(p for p in model.parameters() if p.ndim == 2)
    frozen.requires_grad_(False)
    opt = O.build_optimizer(model, lr=1e-3)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(frozen) not in held and len(held) == len(list(model.parameters())) - 1
    assert opt.defaults["betas"] == (0.9, 0.95)
