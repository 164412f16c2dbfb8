"""The RL loop's plumbing: sequences and masks, prompt order across epochs, mini-batch split, 1 vs 2 processes."""
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitagpr.rl.gspo import gspo_loss
from minitagpr.rl.loop import RLConfig, make_sequences, minibatch_index, prompts_for_step, Prompt
from minitagpr.rollout.base import Completion
from minitagpr.rollout.builtin import BuiltinEngine

HERE = Path(__file__).resolve().parent


def _prompt(ids):
    return Prompt(id="q", task="LaMP-1", user="u", messages=[], ids=ids, gold="[1]")


def test_make_sequences_masks_exactly_the_response_tokens():
    prompts = [_prompt([1, 2, 3]), _prompt([4, 5])]
    comps = [Completion([7, 8], "", [0.0, 0.0], "stop"), Completion([], "", [], "length"),
             Completion([9], "", [0.0], "stop"), Completion([6, 6, 6], "", [0.0] * 3, "length")]
    input_ids, targets, mask = make_sequences(prompts, comps, G=2, pad_id=0)
    assert input_ids.shape == (4, 4)  # longest row 3 + 2 = 5 tokens -> 4 input positions
    assert input_ids[0].tolist() == [1, 2, 3, 7] and targets[0].tolist() == [-100, -100, 7, 8]
    assert targets[1].tolist() == [-100] * 4  # an empty response contributes nothing
    assert input_ids[2].tolist() == [4, 5, 0, 0] and targets[2].tolist() == [-100, 9, -100, -100]
    assert targets[3].tolist() == [-100, 6, 6, 6]
    assert mask.sum().item() == 2 + 0 + 1 + 3


def test_prompt_order_covers_each_epoch_once():
    n, per = 10, 3  # 3 steps per epoch, one prompt dropped per epoch
    for epoch in range(3):
        seen = [i for s in range(epoch * 3, epoch * 3 + 3) for i in prompts_for_step(s, n, per, seed=5)]
        assert len(seen) == len(set(seen)) == 9
    assert prompts_for_step(3, n, per, 5) != prompts_for_step(0, n, per, 5)  # each epoch has its own order


def test_minibatches_hold_whole_groups_of_prompt_i_mod_m():
    idx = minibatch_index(num_prompts=4, G=3, num_minibatches=2)
    assert idx[0].tolist() == [0, 1, 2, 6, 7, 8] and idx[1].tolist() == [3, 4, 5, 9, 10, 11]


def test_micro_batches_order_rows_by_where_their_response_ends():
    from minitagpr.rl.loop import micro_batches, used_columns
    mask = torch.zeros(6, 10, dtype=torch.bool)  # response ends (last target + 1): 4, 9, 0 (empty), 6, 9, 2
    for row, (a, b) in enumerate([(2, 4), (5, 9), (0, 0), (3, 6), (1, 9), (1, 2)]):
        mask[row, a:b] = True
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    chunks = micro_batches(rows, 2, mask)
    assert [c.tolist() for c in chunks] == [[1, 4], [3, 0], [5, 2]]  # longest first, ties in row order
    assert [used_columns(mask[c]) for c in chunks] == [9, 6, 2]  # each chunk is cut at its own last target
    assert [c.tolist() for c in micro_batches(rows, 4)] == [[0, 1, 2, 3], [4, 5]]  # without a mask: row order
    assert used_columns(torch.zeros(2, 5, dtype=torch.bool)) == 1  # only empty responses: one column to run


def test_cut_micro_batches_give_the_update_and_metrics_of_one_full_width_batch(tmp_path, monkeypatch):
    """Reordering rows into micro-batches and cutting each at its last target changes neither the old log-probs,
    nor the gradients, nor the logged GSPO metrics (1e-6): the reference is the loop as it was, one micro-batch per
    mini-batch at the batch's full width. Empty responses included, one micro-batch entirely empty. (lr = 0: Adam's
    first step is about lr * sign(g) for every weight, so comparing weights would amplify rounding noise in tiny
    gradients; the last mini-batch's gradients stay in .grad, the loss and grad norm of both are in the metrics.)"""
    import minitagpr.rl.loop as L
    from minitagpr import distributed as D
    from minitagpr.model.presets import make_tiny_checkpoint
    from minitagpr.train.optim import build_optimizer
    sys.path.insert(0, str(HERE))
    from rl_step_worker import synthetic_batch

    ckpt = make_tiny_checkpoint(tmp_path / "c", seed=4)
    input_ids, targets, _, adv = synthetic_batch(num_prompts=4, G=4, vocab=512, seed=2)
    targets[[3, 10, 11]] = -100  # mini-batch 0 (prompts 0 and 2) gets 3 empty responses: with size 3, the last
    mask = targets != -100       # micro-batch of its sorted rows is all empty
    cut, whole = L.used_columns, L.micro_batches
    info = D.init_distributed()
    try:
        results = []
        for size, full_width in ((3, False), (64, True)):
            if full_width:
                monkeypatch.setattr(L, "used_columns", lambda m: m.shape[1])
                monkeypatch.setattr(L, "micro_batches", lambda rows, n, m=None: whole(rows, n))
            torch.manual_seed(0)
            model = D.build_sharded_causal_lm(ckpt, info, D.device_mesh(info))
            cfg = RLConfig(group_size=4, num_minibatches=2, micro_batch_size=size, eps_low=0.2, eps_high=0.2,
                           prompts_per_step=4)
            rows = [r for chunks in L.micro_batch_plan(mask, 4, cfg) for r in chunks]
            if not full_width:
                assert any(not mask[r].any() for r in rows)  # the all-empty micro-batch exists
            old = L.sequence_logprobs(model, input_ids, targets, rows)
            full, _ = model(input_ids, targets=targets)  # (N, T) one forward over every column
            assert torch.allclose(old, full.detach() * mask, atol=1e-6)
            old = old + 0.01 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1)) * mask
            batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "old_logp": old, "advantages": adv}
            metrics = L.reduce_train_metrics(L.gspo_update(model, build_optimizer(model, 0.0), batch, cfg,
                                                           info.device), info.device)  # lr 0 (docstring)
            grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}  # last mini-batch
            results.append((metrics, grads))
        assert L.used_columns is not cut  # the reference really ran the old way
        (m_cut, g_cut), (m_ref, g_ref) = results
        for name, grad in g_ref.items():
            assert torch.allclose(grad, g_cut[name], atol=1e-7, rtol=1e-4), name
        assert m_ref["gspo/grad_norm"] > 0 and m_ref["gspo/ratio_max"] > 1.0  # something was learned from
        assert m_cut.keys() == m_ref.keys() and m_cut["gspo/empty_sequences"] == 3
        for key in m_ref:
            assert m_cut[key] == pytest.approx(m_ref[key], rel=1e-6, abs=1e-12), key
    finally:
        D.destroy_distributed()


@contextlib.contextmanager
def synthetic_policy(tmp_path):
    """A tiny sharded policy in a one-process group and the synthetic batch of 4 prompts x G=4 (ragged, one empty
    response in seven): yields (model, input_ids, targets, mask, advantages)."""
    from minitagpr import distributed as D
    from minitagpr.model.presets import make_tiny_checkpoint
    sys.path.insert(0, str(HERE))
    from rl_step_worker import synthetic_batch

    ckpt = make_tiny_checkpoint(tmp_path / "c", seed=4)
    input_ids, targets, mask, adv = synthetic_batch(num_prompts=4, G=4, vocab=512, seed=2)
    info = D.init_distributed()
    try:
        yield D.build_sharded_causal_lm(ckpt, info, D.device_mesh(info)), input_ids, targets, mask, adv
    finally:
        D.destroy_distributed()


def one_update(model, batch: dict, cfg: RLConfig, lr: float) -> dict:
    """gspo_update with a fresh AdamW at `lr`; the reduced metrics."""
    import minitagpr.rl.loop as L
    from minitagpr import distributed as D
    from minitagpr.train.optim import build_optimizer
    device = D.world().device
    return L.reduce_train_metrics(L.gspo_update(model, build_optimizer(model, lr), batch, cfg, device), device)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_policy_ratio_is_exactly_one_at_any_temperature(tmp_path, temperature):
    """One mini-batch, one epoch: the update's forward must reproduce the no-grad old log-probs bit for bit, at the
    sampling temperature on both sides (dropping it from either moves the ratio away from 1 at T != 1)."""
    import minitagpr.rl.loop as L
    with synthetic_policy(tmp_path) as (model, input_ids, targets, mask, adv):
        cfg = RLConfig(group_size=4, num_minibatches=1, ppo_epochs=1, micro_batch_size=3, lr=1e-3,
                       prompts_per_step=4, temperature=temperature)
        rows = [r for chunks in L.micro_batch_plan(mask, 4, cfg) for r in chunks]
        old = L.sequence_logprobs(model, input_ids, targets, rows, temperature)
        batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "old_logp": old, "advantages": adv}
        m = one_update(model, batch, cfg, cfg.lr)
    assert m["gspo/ratio_min"] == m["gspo/ratio_max"] == 1.0 and m["gspo/approx_kl"] == 0.0
    assert m["gspo/clip_frac_low"] == m["gspo/clip_frac_high"] == 0.0 and m["gspo/grad_norm"] > 0


def test_a_rank_of_only_empty_responses_packs_the_same_metric_keys():
    """reduce_train_metrics runs collectives over the packed keys: a rank whose responses are all empty must pack the
    same keys as the others (else the all-reduce sizes differ and the ranks hang); min/max then carry the neutral
    element and, when no rank has a sequence, are left out of the log."""
    from minitagpr import distributed as D
    from minitagpr.rl.gspo import gspo_loss
    from minitagpr.rl.loop import _accumulate, reduce_train_metrics

    logp = torch.randn(3, 5)
    full = torch.ones(3, 5, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.5])
    some, empty = {}, {}
    _accumulate(some, gspo_loss(logp, logp - 0.01, adv, full)[1])
    _accumulate(empty, gspo_loss(logp, logp - 0.01, adv, torch.zeros_like(full))[1])
    assert sorted(empty) == sorted(some)
    D.init_distributed()
    try:
        out = reduce_train_metrics(empty, torch.device("cpu"))
        assert out["gspo/num_sequences"] == 0 and not any(k.endswith(("_min", "_max")) for k in out)
        assert "gspo/ratio_max" in reduce_train_metrics(some, torch.device("cpu"))
    finally:
        D.destroy_distributed()


@pytest.mark.parametrize("key, value, message", [
    ("lr", 0.0, "lr must be a finite number > 0"), ("lr", float("nan"), "lr must be a finite number > 0"),
    ("min_lr_ratio", float("nan"), r"min_lr_ratio must be a finite number in \[0, 1\]"),
    ("min_lr_ratio", 2.0, r"min_lr_ratio must be a finite number in \[0, 1\]"),
    ("warmup_steps", -1, "warmup_steps must be a finite number >= 0"),
    ("grad_clip", -1.0, "grad_clip must be a finite number >= 0"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number >= 0")])
def test_config_rejects_optimizer_settings_outside_their_range(key, value, message):
    """A NaN min_lr_ratio poisoned every weight at the first decay step; above 1 the lr climbed past its peak; a
    negative clip norm turned clipping off (pinned 2026-11-29)."""
    with pytest.raises(ValueError, match=message):
        RLConfig(**{key: value})
    RLConfig(min_lr_ratio=0.0, grad_clip=0.0, warmup_steps=0)  # the edges are allowed


@pytest.mark.parametrize("key, value, message", [
    ("eps_low", 1.5, r"eps_low must be a finite number in \[0, 1\), got 1.5"),
    ("eps_low", float("nan"), "eps_low must be a finite number in"),
    ("eps_high", -1.0, "eps_high must be a finite number >= 0"),
    ("epochs", 0.0, "epochs must be a finite number > 0"),
    ("epochs", -3.0, "epochs must be a finite number > 0"),
    ("epochs", float("nan"), "epochs must be a finite number > 0"),
    ("epochs", float("inf"), "epochs must be a finite number > 0"),
    ("seed", -1, r"seed must be a finite number in \[0, 2147483648\), got -1"),
    ("seed", 10**15, "seed must be a finite number in"),
    ("save_every", -1, "save_every must be >= 0"),
    ("keep_last", -2, "keep_last must be >= 0"),
    ("max_steps", -1, "max_steps must be >= 0"),
    ("gamma", float("nan"), "gamma must be a finite number, got nan")])
def test_config_rejects_clip_epochs_seed_and_plumbing_outside_their_range(key, value, message):
    """Each was accepted: a bad eps failed inside gspo_loss after the models loaded (a traceback), epochs <= 0
    trained one step, a NaN or infinite epochs died in int(), seed -1 gave Stage 3 Stage 2's prompt order
    (2 * -1 + 1 = -1) and a huge seed overflowed the generator at step 0."""
    with pytest.raises(ValueError, match=message):
        RLConfig(**{key: value})
    RLConfig(eps_low=0.0, eps_high=0.0, epochs=0.01, seed=2**31 - 1)  # the edges are allowed


def test_exploratory_seed_differs_from_guided_for_every_allowed_seed():
    from minitagpr.rl.loop import stage_seed
    for seed in (0, 1, 7, 2**31 - 1):
        assert stage_seed(RLConfig(stage="guided", seed=seed)) != stage_seed(RLConfig(stage="exploratory", seed=seed))


def test_config_rejects_uneven_minibatches_and_truncated_sampling():
    with pytest.raises(ValueError, match="not a multiple of num_minibatches"):
        RLConfig(prompts_per_step=6, num_minibatches=4)
    with pytest.raises(ValueError, match="use top_p=1"):
        RLConfig(top_p=0.9)


def test_config_rejects_a_task_listed_twice_in_the_mix():
    """LaMP-1 and LaMP_1 were two seeded draws of one task: repeated prompts, and per-task metrics of one entry."""
    with pytest.raises(ValueError, match="tasks: LaMP-1 appears more than once"):
        RLConfig(tasks="LaMP-1:10,LaMP_1:20")
    with pytest.raises(ValueError, match=r"tasks: PGraphRAG-title is not a LaMP task; RL draws its prompts from a "
                                          r"LaMP-format data_root="):  # was found missing only when the files were read
        RLConfig(tasks="LaMP-1:10,PGraphRAG-title:20")


def test_config_rejects_unknown_engines_and_decode_loops():
    with pytest.raises(ValueError, match="engine must be"):
        RLConfig(engine="hf")
    with pytest.raises(ValueError, match="builtin_decode must be"):
        RLConfig(builtin_decode="cuda")
    assert RLConfig(builtin_decode="graph").builtin_decode == "graph"


def test_the_update_clips_the_ratio_with_eps_low_below_and_eps_high_above(tmp_path):
    """An asymmetric band (0.05 below, 0.3 above): the update's loss is gspo_loss's with the config's eps_low and
    eps_high, not with the two swapped (every other test uses one value for both)."""
    with synthetic_policy(tmp_path) as (model, input_ids, targets, mask, adv):
        cfg = RLConfig(group_size=4, num_minibatches=1, ppo_epochs=1, micro_batch_size=16, eps_low=0.05,
                       eps_high=0.3, prompts_per_step=4)
        with torch.no_grad():
            logp, _ = model(input_ids, targets=targets)  # (N, T) pi_theta before the (lr = 0) step
        # pi_old off by a per-sequence shift: sequence ratios spread over about [0.6, 1.6]
        order = torch.randperm(len(adv), generator=torch.Generator().manual_seed(0))
        shift = torch.linspace(-0.5, 0.5, len(adv))[order]
        old = (logp + shift[:, None]) * mask
        batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "old_logp": old, "advantages": adv}
        m = one_update(model, batch, cfg, lr=0.0)
    n = int(mask.any(dim=1).sum())
    right, _ = gspo_loss(logp, old, adv, mask, eps_low=0.05, eps_high=0.3, num_sequences=n)
    swapped, _ = gspo_loss(logp, old, adv, mask, eps_low=0.3, eps_high=0.05, num_sequences=n)
    assert abs(right.item() - swapped.item()) > 1e-3  # the band's two sides matter on this batch
    assert m["gspo/loss"] == pytest.approx(right.item(), rel=1e-5)


@pytest.mark.parametrize("grad_clip", [0.0, 1e-12])
def test_the_update_clips_the_gradient_norm_to_grad_clip(tmp_path, grad_clip):
    """A norm clipped to 1e-12 leaves each gradient entry far below Adam's eps (1e-8), so the first step moves no
    weight by more than about 1e-4 x lr; unclipped, Adam's first step moves the weights by about lr. (An update
    that skips the clipping moves them by lr with any grad_clip.)"""
    import minitagpr.rl.loop as L
    lr = 1e-3
    with synthetic_policy(tmp_path) as (model, input_ids, targets, mask, adv):
        before = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        cfg = RLConfig(group_size=4, num_minibatches=1, ppo_epochs=1, micro_batch_size=16, grad_clip=grad_clip,
                       prompts_per_step=4, lr=lr)
        old = L.sequence_logprobs(model, input_ids, targets, [torch.arange(len(adv))])
        batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "old_logp": old, "advantages": adv}
        m = one_update(model, batch, cfg, lr)
        moved = max((p.full_tensor().detach() - before[n]).abs().max().item() for n, p in model.named_parameters())
    assert m["gspo/grad_norm"] > 1e-3  # the norm before clipping is logged either way
    if grad_clip:
        assert moved < 2e-4 * lr, moved
    else:
        assert moved > 0.5 * lr, moved


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_worker(nproc, ckpt, out, **overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           str(HERE / "rl_step_worker.py"), str(ckpt), str(out), json.dumps(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("token_level", [False, True])
def test_two_process_gspo_step_equals_one_process(tmp_path, token_level):
    from minitagpr.model.presets import make_tiny_checkpoint
    ckpt = make_tiny_checkpoint(tmp_path / "c", seed=3)
    one = _run_worker(1, ckpt, tmp_path / "one.pt", token_level=token_level)
    two = _run_worker(2, ckpt, tmp_path / "two.pt", token_level=token_level)
    assert one["metrics"]["gspo/loss"] == pytest.approx(two["metrics"]["gspo/loss"], rel=1e-4, abs=1e-7)
    assert one["metrics"]["gspo/num_sequences"] == two["metrics"]["gspo/num_sequences"]
    # every logged statistic is global: min/max reduced, KL per token, the advantage std pooled, N per step
    assert sorted(one["metrics"]) == sorted(two["metrics"])
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert one["metrics"]["gspo/num_sequences_norm"] == one["metrics"]["gspo/num_sequences"] / 2  # 2 mini-batches
    # the gradient's scale: Adam nearly hides a gradient averaged over ranks instead of summed, the norm does not
    assert one["metrics"]["gspo/grad_norm"] == pytest.approx(two["metrics"]["gspo/grad_norm"], rel=1e-4)
    for name, w in one["weights"].items():
        diff = (w - two["weights"][name]).abs().max().item()
        assert diff <= 1e-4 * max(1.0, w.abs().max().item()), name
    start = make_tiny_checkpoint(tmp_path / "c2", seed=3)
    from minitagpr.model import load_pretrained
    w0 = load_pretrained(start).state_dict()
    assert any((one["weights"][n] - w0[n]).abs().max() > 0 for n in one["weights"])  # the step moved the weights


# ----------------------------------------------------------------------------------------------- whole-run behaviour
@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from minitagpr.data import demo_world
    from minitagpr.model.presets import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("rl")
    world = demo_world.build(root / "world", num_users=6, dev_users=2, per_user=2, shared_per_user=1)
    policy = make_tiny_checkpoint(root / "policy", preset="tiny", seed=0, tokenizer_dir=world.tokenizer_dir)
    return root / "world", policy


def _rl_args(world, policy, out, **extra):
    args = dict(policy=policy, data_root=world, out_dir=out, tasks="LaMP-2:0,LaMP-3:0", k=2, max_prompt_tokens=700,
                group_size=2, prompts_per_step=4, num_minibatches=2, micro_batch_size=4, max_new_tokens=12,
                max_steps=4, save_every=2, lr=1e-3, use_prmu=False, use_tag_reward=False)
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def _torchrun_recipe(args, env_extra=None, check=True, script=HERE.parent / "recipes" / "exploratory_rl.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


def _log(out):
    import json
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_continues_the_exact_step_sequence(small_world, tmp_path):
    # the world gives 16 LaMP-2 + LaMP-3 prompts, 4 per step: an epoch is 4 steps, so the checkpoint after step 4
    # sits on the epoch boundary and the resumed steps 5-6 are the first of the second epoch's order
    world, policy = small_world
    steps = dict(max_steps=6, save_every=4)
    _torchrun_recipe(_rl_args(world, policy, tmp_path / "whole", **steps))
    # the last step is checkpointed too (a kill during the export resumes into it), and the run's settings written
    assert sorted(d.name for d in (tmp_path / "whole" / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    assert "save_every: 4" in (tmp_path / "whole" / "config.yaml").read_text()
    crashed = _torchrun_recipe(_rl_args(world, policy, tmp_path / "cut", **steps), {"MINITAGPR_FAULT": "step:5"},
                               check=False)
    assert crashed.returncode != 0
    assert [r["step"] for r in _log(tmp_path / "cut")] == [1, 2, 3, 4, 5]  # step 5 ran after the checkpoint at 4
    _torchrun_recipe(_rl_args(world, policy, tmp_path / "cut", **steps))
    whole, cut = _log(tmp_path / "whole"), _log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]  # none skipped, none repeated
    # A random policy earns reward 0 everywhere, so loss and reward are constants here: the digest of the prompts
    # and sampled ids is what shows that the resumed steps trained on what the uninterrupted run trained on.
    assert [r["batch_digest"] for r in cut] == [r["batch_digest"] for r in whole]
    assert len({r["batch_digest"] for r in whole}) == 6  # and it tells the steps apart
    for a, b in zip(whole, cut):
        for key in ("reward_mean", "gspo/loss", "response_len_mean", "gspo/ratio_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)


def test_a_resumed_run_restores_the_weights_optimizer_and_engine_it_trained(small_world, tmp_path, monkeypatch):
    # The SIGKILL test above runs a random policy whose rewards are all 0, so nothing trains there: it shows the
    # step sequence, not the state. Here rewards are a function of the sampled ids (groups have variance, every
    # update moves the weights), so the steps after a resume sample and score what the uninterrupted run did only
    # if the policy, AdamW's moments and the rollout engine's copy of the weights all came back from step 4.
    from minitagpr import distributed as D
    from minitagpr.config import parse_cli
    from minitagpr.model import load_pretrained
    from minitagpr.rl import loop

    real_rewards, real_fault = loop.compute_rewards, D.fault_point

    def id_rewards(prompts, completions, cfg, prmu=None):
        parts, _ = real_rewards(prompts, completions, cfg, prmu)
        return parts, torch.tensor([sum(c.token_ids) % 7 / 7 for c in completions], dtype=torch.float64)

    class Killed(Exception):
        pass

    def kill_at_step_5(where, step):
        if (where, step) == ("step", 5):
            raise Killed
        real_fault(where, step)

    monkeypatch.setattr(loop, "compute_rewards", id_rewards)
    world, policy = small_world
    steps = dict(max_steps=6, save_every=4, stage="exploratory", warmup_steps=2, min_lr_ratio=0.5)
    loop.train(parse_cli(loop.RLConfig, _rl_args(world, policy, tmp_path / "whole", **steps)))
    monkeypatch.setattr(D, "fault_point", kill_at_step_5)
    with pytest.raises(Killed):
        loop.train(parse_cli(loop.RLConfig, _rl_args(world, policy, tmp_path / "cut", **steps)))
    monkeypatch.setattr(D, "fault_point", real_fault)
    loop.train(parse_cli(loop.RLConfig, _rl_args(world, policy, tmp_path / "cut", **steps)))
    whole, cut = _log(tmp_path / "whole"), _log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    # the schedule the config asks for, by hand: warmup 1/2, 1; cosine from 1 to 0.5 over the remaining 4 steps
    for run in (whole, cut):
        assert [r["lr"] for r in run] == pytest.approx([1e-3 * m for m in (0.5, 1.0, 1.0, 0.875, 0.625, 0.5)])
    assert all(abs(r["gspo/loss"]) > 1e-6 for r in whole)  # every step's update moved the weights
    for r in whole:  # the loss reads the per-group advantages the step logged, sign and all (a mutation audit found
        for stat in ("min", "max", "mean"):  # batch-wide standardisation, a flipped sign or A >= 0 unpinned)
            assert r[f"gspo/adv_{stat}"] == pytest.approx(r[f"group/adv_{stat}"], abs=1e-6), (r["step"], stat)
        assert r["group/adv_min"] < 0 < r["group/adv_max"]
    for a, b in zip(whole, cut):
        assert a["batch_digest"] == b["batch_digest"], a["step"]  # step 6 samples from step 5's update
        for key in ("reward_mean", "gspo/loss", "gspo/ratio_mean", "gspo/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)
    w_whole = load_pretrained(tmp_path / "whole" / "export").state_dict()
    w_cut = load_pretrained(tmp_path / "cut" / "export").state_dict()
    assert all(torch.allclose(w_whole[k], w_cut[k], rtol=1e-5, atol=1e-7) for k in w_whole)


def test_non_finite_reward_stops_with_the_step(small_world, tmp_path, monkeypatch):
    from minitagpr.rl import loop
    world, policy = small_world
    real = loop.score_batch

    def poisoned(*a, **kw):
        parts = real(*a, **kw)
        parts[1].total = float("nan")
        return parts
    monkeypatch.setattr(loop, "score_batch", poisoned)
    from minitagpr.config import parse_cli
    cfg = parse_cli(loop.RLConfig, _rl_args(world, policy, tmp_path / "nan", stage="exploratory"))
    with pytest.raises(loop.NonFiniteError, match=r"\[exploratory\] step 1: 1 non-finite reward\(s\), responses \[1\]"):
        loop.train(cfg)


def test_a_prompt_plus_max_new_tokens_past_the_policys_positions_is_refused_before_training(small_world, tmp_path):
    """The engine refused it only at the step that drew the longest prompt, on that prompt's rank."""
    import json
    from minitagpr.config import ConfigError, parse_cli
    from minitagpr.rl import loop
    world, policy = small_world
    positions = json.loads((Path(policy) / "config.json").read_text())["max_position_embeddings"]
    cfg = parse_cli(loop.RLConfig, _rl_args(world, policy, tmp_path / "long", stage="exploratory",
                                            max_new_tokens=positions))
    with pytest.raises(ConfigError, match=rf"prompt '\d+' \(LaMP-[23]\) has \d+ tokens; with max_new_tokens="
                                          rf"{positions} it exceeds the policy's max_position_embeddings={positions}"):
        loop.train(cfg)
    assert not (tmp_path / "long" / "checkpoints").exists()


def test_at_temperature_07_the_samples_and_pi_old_are_the_policy_at_that_temperature(small_world, tmp_path):
    """Every other run is at T = 1, where a rollout or an old-log-prob pass that drops the temperature is not seen:
    the sampler's log-probs must equal pi_old's, and with one mini-batch the ratio must be exactly 1."""
    from minitagpr.config import parse_cli
    from minitagpr.rl import loop
    world, policy = small_world
    out = tmp_path / "t07"
    loop.train(parse_cli(loop.RLConfig, _rl_args(world, policy, out, stage="exploratory", temperature=0.7,
                                                 num_minibatches=1, max_steps=1, save_every=0)))
    row = _log(out)[0]
    assert row["rollout/logp_gap_max"] < 1e-4, row["rollout/logp_gap_max"]
    assert row["gspo/ratio_min"] == pytest.approx(1.0, abs=1e-6) == row["gspo/ratio_max"]


def test_a_batch_that_does_not_split_over_the_ranks_names_valid_sizes(small_world, tmp_path):
    # 4 prompts on 2 ranks are 2 per rank, which 4 mini-batches cannot share: valid sizes are multiples of 8
    world, policy = small_world
    res = _torchrun_recipe(_rl_args(world, policy, tmp_path / "odd", prompts_per_step=4, num_minibatches=4),
                           check=False)
    assert res.returncode != 0
    assert "prompts_per_step=4 must split into 2 rank(s) x a multiple of num_minibatches=4 prompts: a multiple of " \
           "8, e.g. prompts_per_step=8" in res.stderr, res.stderr[-2000:]


def test_the_fixed_shape_decode_loop_runs_the_same_rl_steps_as_the_dynamic_one(small_world, tmp_path, monkeypatch):
    # on CUDA the RL engine decodes with the fixed-shape step replayed as a CUDA graph ("auto"); "static" is that step
    # run eagerly. Across an update and a weight sync (step 2 samples from the changed policy) both loops must sample
    # the same ids. A random policy earns no reward (R_f = 0), so the rewards here are a function of the ids: groups
    # then have variance and the update moves the weights.
    from minitagpr.config import parse_cli
    from minitagpr.rl import loop

    real_generate, real_rewards = BuiltinEngine.generate, loop.compute_rewards
    sampled, modes = [], set()

    def recording(self, *args, **kwargs):
        modes.add(self.decode_mode())  # the loop the engine really ran
        groups = real_generate(self, *args, **kwargs)
        sampled.append([[list(c.token_ids) for c in group] for group in groups])
        return groups

    def id_rewards(prompts, completions, cfg, prmu=None):
        parts, _ = real_rewards(prompts, completions, cfg, prmu)
        return parts, torch.tensor([sum(c.token_ids) % 7 / 7 for c in completions], dtype=torch.float64)

    monkeypatch.setattr(BuiltinEngine, "generate", recording)
    monkeypatch.setattr(loop, "compute_rewards", id_rewards)
    world, policy = small_world
    runs = {}
    for mode in ("dynamic", "static"):
        sampled.clear()
        modes.clear()
        out = tmp_path / mode
        loop.train(parse_cli(loop.RLConfig, _rl_args(world, policy, out, max_steps=2, builtin_decode=mode,
                                                     stage="exploratory")))
        assert modes == {mode}
        runs[mode] = (list(sampled), _log(out))
    (ids_d, log_d), (ids_s, log_s) = runs["dynamic"], runs["static"]
    assert len(ids_d) == 2 and ids_d == ids_s  # both steps, every sample, token for token
    assert ids_d[0] != ids_d[1]  # the steps sample different prompts
    assert abs(log_d[0]["gspo/loss"]) > 1e-6  # the first update moved the policy that step 2 samples from
    for a, b in zip(log_d, log_s, strict=True):
        assert a["gspo/loss"] == pytest.approx(b["gspo/loss"], rel=1e-5, abs=1e-8), a["step"]


def test_one_and_two_processes_sample_and_score_the_same_first_step(small_world, tmp_path):
    # rewards from the sampled ids (tests/rl_id_rewards.py): a random policy's real rewards are all 0, which made
    # rewards, advantages and loss 0 = 0 on both sides and hid any 2-rank bug in gathering or reducing them
    from safetensors.torch import load_file
    world, policy = small_world
    script = HERE / "rl_id_rewards.py"
    _torchrun_recipe(_rl_args(world, policy, tmp_path / "two", max_steps=1), script=script)
    cmd_args = _rl_args(world, policy, tmp_path / "one", max_steps=1)
    res = subprocess.run([sys.executable, str(script), *cmd_args],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    one, two = _log(tmp_path / "one")[0], _log(tmp_path / "two")[0]
    assert one["batch_digest"] == two["batch_digest"]  # the same prompts and sampled ids
    assert one["group/adv_std"] > 0 and one["reward_mean"] > 0  # the step had something to learn from
    for key in ("reward_mean", "response_len_mean", "format_pass_rate", "group/adv_std", "gspo/num_tokens",
                "group/zero_variance_share", "group/adv_max"):
        assert one[key] == pytest.approx(two[key], rel=1e-9), key
    assert abs(one["gspo/loss"]) > 1e-6
    assert one["gspo/loss"] == pytest.approx(two["gspo/loss"], rel=1e-4, abs=1e-7)
    w1, w2, w0 = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "one" / "export",
                                                                    tmp_path / "two" / "export", Path(policy)))
    assert any(not torch.equal(w1[k], w0[k]) for k in w0)  # the update moved the weights ...
    for k in w1:  # ... and 1 and 2 processes moved them alike
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    # the FLOPs behind mfu are the whole global batch's, whatever the number of ranks (mfu x ranks x train_s)
    assert one["mfu"] * one["train_s"] == pytest.approx(two["mfu"] * 2 * two["train_s"], rel=1e-9)


def test_reward_metrics_break_the_rewards_down_per_task():
    from minitagpr import distributed as D
    from minitagpr.rewards import RewardParts
    from minitagpr.rl.loop import reward_metrics

    D.init_distributed()  # a group of one (no torchrun environment); torn down below
    try:
        cfg = RLConfig(tasks="LaMP-1:0,LaMP-4:0,LaMP-7:0", group_size=2)
        tasks = ["LaMP-4", "LaMP-4", "LaMP-1", "LaMP-1"]
        r_v = [0.2, 0.4, 1.0, 0.0]
        parts = [RewardParts(r_v=v, r_f=1.0, r_rep=0.0, r_tag=0.0, r_prmu=0.5) for v in r_v]
        rewards = torch.tensor([0.1, 0.3, 0.9, -0.5], dtype=torch.float64)
        comps = [Completion([1], "", [0.0], "stop")] * 4
        m = reward_metrics(parts, rewards, comps, cfg, "cpu", tasks=tasks)
        assert m["r_v_mean/LaMP-4"] == pytest.approx(0.3) and m["r_v_mean/LaMP-1"] == pytest.approx(0.5)
        assert m["reward_mean/LaMP-4"] == pytest.approx(0.2) and m["reward_mean/LaMP-1"] == pytest.approx(0.2)
        assert "r_v_mean/LaMP-7" not in m  # not sampled this step: absent, not a fake 0
        assert m["r_v_mean"] == pytest.approx(0.4)
    finally:
        D.destroy_distributed()


def test_classification_r_v_is_exact_match_like_the_evaluation_unless_asked():
    """tagpr-method.md: R_v of LaMP-1/2/3 is exact match, which is also how the official evaluation scores; the
    project's lenient normalisation ("4 stars" -> "4") is opt-in (normalize_answers=true)."""
    from minitagpr.rl.loop import compute_rewards

    prompt = Prompt(id="q", task="LaMP-3", user="u", messages=[], ids=[1], gold="4")
    comps = [Completion([1], "<think>x</think>" + text, [0.0], "stop") for text in ("4", " 4 ", "4 stars")]
    for normalize, expected in ((False, [1.0, 1.0, 0.0]), (True, [1.0, 1.0, 1.0])):
        cfg = RLConfig(tasks="LaMP-3:0", group_size=3, stage="exploratory", normalize_answers=normalize)
        parts, _ = compute_rewards([prompt], comps, cfg)
        assert [p.r_v for p in parts] == expected, normalize


def test_resume_may_change_plumbing_but_not_the_lr_decay_length():
    from dataclasses import asdict

    from minitagpr.config import ConfigError
    from minitagpr.rl.loop import _check_resumed_config

    saved = asdict(RLConfig(max_steps=10, min_lr_ratio=1.0))
    _check_resumed_config(saved, RLConfig(max_steps=20, min_lr_ratio=1.0, save_every=5), Path("ck"))  # constant lr
    with pytest.raises(ConfigError, match=r"ck: resuming with settings .*lr 1e-06 -> 0.001"):
        _check_resumed_config(saved, RLConfig(max_steps=10, lr=1e-3), Path("ck"))
    decaying = asdict(RLConfig(max_steps=10, min_lr_ratio=0.1))
    with pytest.raises(ConfigError, match=r"max_steps 10 -> 20"):  # where the cosine ends moves every later lr
        _check_resumed_config(decaying, RLConfig(max_steps=20, min_lr_ratio=0.1), Path("ck"))


def test_a_response_cut_by_the_length_limit_gets_no_format_reward():
    from minitagpr.rl.loop import compute_rewards

    prompt = Prompt(id="q", task="LaMP-4", user="u", messages=[], ids=[1], gold="The cat sat on the mat")
    text = "<think><analyze_input>a</analyze_input></think>The cat sat"  # parses as chain + answer either way
    comps = [Completion([1, 2], text, [0.0, 0.0], reason) for reason in ("stop", "length")]
    cfg = RLConfig(tasks="LaMP-4:0", group_size=2, stage="exploratory")
    done, cut = compute_rewards([prompt], comps, cfg)[0]
    assert done.r_f == 1.0 and done.total > 0.0
    assert cut.r_f == 0.0 and cut.total == 0.0


def test_resume_ignores_a_recipes_own_keys():
    # the demo driver's keys (e.g. exploratory_steps) live in the saved config but do not change this stage's steps
    from dataclasses import asdict, dataclass

    from minitagpr.rl.loop import _check_resumed_config

    @dataclass
    class Driver(RLConfig):
        exploratory_steps: int = 8

    _check_resumed_config(asdict(Driver()), Driver(exploratory_steps=32), Path("ck"))


def test_a_key_the_checkpoint_predates_counts_as_its_default_on_resume():
    """A checkpoint saved before a key existed trained as the key's default: resuming with the default is fine,
    resuming with another value changes training mid-run and is refused, naming the key (it was let through)."""
    from dataclasses import asdict

    from minitagpr.config import ConfigError
    from minitagpr.rl.loop import _check_resumed_config

    saved = asdict(RLConfig())
    del saved["token_level"]  # as if written before the key existed
    _check_resumed_config(saved, RLConfig(), Path("ck"))
    with pytest.raises(ConfigError, match=r"token_level False \(not saved: the default when it was written\) -> True"):
        _check_resumed_config(saved, RLConfig(token_level=True), Path("ck"))
    _check_resumed_config({}, RLConfig(token_level=True), Path("ck"))  # no saved config at all: nothing to compare


def test_the_two_stages_draw_different_prompt_orders_and_samples_with_one_seed():
    from minitagpr.rl.loop import rollout_seed, stage_seed

    guided, exploratory = RLConfig(stage="guided", seed=0), RLConfig(stage="exploratory", seed=0)
    assert all(stage_seed(RLConfig(stage="guided", seed=k)) == k for k in range(5))  # guided: the run seed
    assert prompts_for_step(0, 64, 8, stage_seed(guided)) != prompts_for_step(0, 64, 8, stage_seed(exploratory))
    assert rollout_seed(stage_seed(guided), 0) != rollout_seed(stage_seed(exploratory), 0)
    assert all(stage_seed(RLConfig(stage="guided", seed=k)) != stage_seed(RLConfig(stage="exploratory", seed=k))
               for k in range(50))


def test_the_vllm_engine_gets_room_for_a_whole_prompt_and_response(monkeypatch):
    import minitagpr.rollout.vllm_engine as V
    from minitagpr.rl.loop import build_engine

    seen = {}

    class Recording:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(V, "VLLMEngine", Recording)
    build_engine(RLConfig(engine="vllm", max_prompt_tokens=4096, max_new_tokens=2048), None, None)
    assert seen["max_model_len"] == 6144 and seen["gpu_memory_utilization"] == 0.3
    build_engine(RLConfig(engine="vllm", vllm_gpu_memory_utilization=0.5), None, None)
    assert seen["gpu_memory_utilization"] == 0.5
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization must be in"):
        RLConfig(vllm_gpu_memory_utilization=1.5)


def test_counts_are_the_batchs_own_whatever_the_number_of_ppo_epochs(tmp_path):
    import minitagpr.rl.loop as L
    from minitagpr import distributed as D
    from minitagpr.model.presets import make_tiny_checkpoint
    from minitagpr.train.optim import build_optimizer
    sys.path.insert(0, str(HERE))
    from rl_step_worker import synthetic_batch

    ckpt = make_tiny_checkpoint(tmp_path / "c", seed=4)
    input_ids, targets, _, adv = synthetic_batch(num_prompts=4, G=4, vocab=512, seed=2)
    targets[[3, 10]] = -100
    mask = targets != -100
    info = D.init_distributed()
    try:
        model = D.build_sharded_causal_lm(ckpt, info, D.device_mesh(info))
        cfg = RLConfig(group_size=4, num_minibatches=2, ppo_epochs=3, micro_batch_size=8, lr=1e-4,
                       prompts_per_step=4)
        rows = [r for chunks in L.micro_batch_plan(mask, 4, cfg) for r in chunks]
        old = L.sequence_logprobs(model, input_ids, targets, rows)
        batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "old_logp": old, "advantages": adv}
        m = L.reduce_train_metrics(L.gspo_update(model, build_optimizer(model, cfg.lr), batch, cfg, info.device),
                                   info.device)
    finally:
        D.destroy_distributed()
    assert m["gspo/num_sequences"] == 14 and m["gspo/empty_sequences"] == 2
    assert m["gspo/num_tokens"] == int(mask.sum())


# ----------------------------------------------------------------------------------------------- pinned by mutation
# Each test below fails on a mutant that the suite let through (hand-made mutation sweep, 2026-11-27).

_TAGGED = "<think><analyze_input>a</analyze_input><examine_examples>b</examine_examples>" \
          "<make_decision>c</make_decision></think>"


def test_rl_rewards_penalise_repeated_4_grams_not_3_grams():
    """score_batch's default n is what RL uses for R_rep (compute_rewards passes none): n = 4 as in the paper."""
    from minitagpr.rewards import repetition_reward
    from minitagpr.rl.loop import compute_rewards

    prompt = Prompt(id="q", task="LaMP-4", user="u", messages=[], ids=[1], gold="a b c")
    texts = [_TAGGED + "a b c a b c d", _TAGGED + "a b c d a b c d e"]  # a repeated 3-gram; a repeated 4-gram
    comps = [Completion([1], t, [0.0], "stop") for t in texts]
    parts, _ = compute_rewards([prompt], comps, RLConfig(tasks="LaMP-4:0", group_size=2, stage="exploratory"))
    assert parts[0].r_rep == 0.0 and parts[1].r_rep < 0.0
    assert [p.r_rep for p in parts] == [repetition_reward(t, n=4) for t in texts]


def test_without_the_tag_reward_a_chain_that_fails_the_tag_check_loses_nothing():
    from minitagpr.rl.loop import compute_rewards

    prompt = Prompt(id="q", task="LaMP-3", user="u", messages=[], ids=[1], gold="4")
    comps = [Completion([1], "<think>no tags here</think>4", [0.0], "stop")] * 2
    base = dict(tasks="LaMP-3:0", group_size=2, stage="guided", use_prmu=False)
    off, _ = compute_rewards([prompt], comps, RLConfig(**base, use_tag_reward=False))
    on, _ = compute_rewards([prompt], comps, RLConfig(**base))
    assert off[0].r_tag == -1.0 and off[0].total == pytest.approx(0.8 * (off[0].r_v + off[0].r_rep) * off[0].r_f)
    assert on[0].total == pytest.approx(off[0].total - 0.8)


def test_a_non_finite_prmu_score_makes_the_reward_non_finite():
    """So check_finite stops the run; scored as 0 it would train on silently."""
    from minitagpr.rl.loop import compute_rewards

    class NanPRMU:
        def score(self, users, prompts, texts):
            return [0.5, float("nan")]

    prompt = Prompt(id="q", task="LaMP-3", user="u", messages=[], ids=[1], gold="4")
    comps = [Completion([1], _TAGGED + "4", [0.0], "stop")] * 2
    _, rewards = compute_rewards([prompt], comps, RLConfig(tasks="LaMP-3:0", group_size=2, stage="guided"),
                                 NanPRMU())
    assert torch.isfinite(rewards[0]) and torch.isnan(rewards[1])


def test_rewards_pair_each_response_with_its_own_prompts_gold_user_and_messages():
    """Two prompts x G = 2 with distinct golds and users (a mutation audit found that golds interleaved across
    prompts, or no user ids sent to the PRMU, passed every test: they used one prompt, or rewards of 0)."""
    from minitagpr.rl.loop import compute_rewards

    class EchoPRMU:  # a score per user, and a record of what it was asked
        def __init__(self):
            self.asked = None

        def score(self, users, prompts, texts):
            self.asked = (list(users), list(prompts), list(texts))
            return [{"alice": 0.9, "bob": 0.1}.get(u, 0.5) for u in users]

    prompts = [Prompt(id="q0", task="LaMP-3", user="alice", messages=[{"role": "user", "content": "m0"}], ids=[1],
                      gold="4"),
               Prompt(id="q1", task="LaMP-3", user="bob", messages=[{"role": "user", "content": "m1"}], ids=[2],
                      gold="2")]
    comps = [Completion([1], _TAGGED + answer, [0.0], "stop") for answer in ("4", "2", "4", "2")]
    prmu = EchoPRMU()
    cfg = RLConfig(tasks="LaMP-3:0", group_size=2, stage="guided", alpha=0.8, beta=0.8, gamma=0.2)
    parts, rewards = compute_rewards(prompts, comps, cfg, prmu)
    assert [p.r_v for p in parts] == [1.0, 0.0, 0.0, 1.0]  # each response against its own prompt's gold
    assert prmu.asked[0] == ["alice", "alice", "bob", "bob"]
    assert [m[0]["content"] for m in prmu.asked[1]] == ["m0", "m0", "m1", "m1"]
    assert prmu.asked[2] == [c.text for c in comps]
    expected = [0.8 * v + 0.2 * s for v, s in ((1, 0.9), (0, 0.9), (0, 0.1), (1, 0.1))]  # R_rep 0, R_f 1, R_tag 0
    assert rewards.tolist() == pytest.approx(expected)


def test_reward_metrics_pin_every_column_on_a_hand_made_batch():
    from minitagpr import distributed as D
    from minitagpr.rewards import RewardParts
    from minitagpr.rl.loop import reward_metrics

    D.init_distributed()  # a group of one
    try:
        cfg = RLConfig(tasks="LaMP-1:0,LaMP-4:0", group_size=2)
        tasks = ["LaMP-4", "LaMP-4", "LaMP-1", "LaMP-1"]
        parts = [RewardParts(r_v=v, r_f=f, r_rep=rep, r_tag=tag, r_prmu=0.5)
                 for v, f, rep, tag in ((0.5, 1.0, 0.0, 0.0), (0.5, 0.0, -0.2, -1.0), (1.0, 1.0, 0.0, 0.0),
                                        (0.0, 1.0, 0.0, 0.0))]
        rewards = torch.tensor([0.2, 0.4, 0.9, 0.1], dtype=torch.float64)  # per-task means 0.3 / 0.5, global 0.4
        comps = [Completion([1] * n, "", [0.0] * n, r)
                 for n, r in ((1, "stop"), (2, "stop"), (3, "length"), (2, "stop"))]
        m = reward_metrics(parts, rewards, comps, cfg, "cpu", tasks=tasks)
        assert m["reward_mean/LaMP-4"] == pytest.approx(0.3) and m["reward_mean/LaMP-1"] == pytest.approx(0.5)
        assert m["responses/LaMP-4"] == 2 and m["responses/LaMP-1"] == 2  # what the demo's trends weigh by
        assert m["reward_mean"] == pytest.approx(0.4)
        assert m["tag_pass_rate"] == 0.75 and m["format_pass_rate"] == 0.75
        assert m["r_rep_mean"] == pytest.approx(-0.05)
        assert m["response_len_mean"] == 2.0 and m["truncated_share"] == 0.25
        # groups (0.2, 0.4) and (0.9, 0.1): advantages +-1 each, no zero-variance group
        assert m["group/adv_std"] == pytest.approx(1.0, abs=1e-5) and m["group/zero_variance_groups"] == 0
        # these rewards are not the parts' composite, so the correlations say how far each term goes along with
        # them. Group 1: rewards (0.2, 0.4); foundation 0.8 * (0.5, 0.3 * R_f 0) = (0.4, 0): corr -1; tag
        # 0.8 * (0, -1): corr -1. Group 2: rewards (0.9, 0.1); foundation (0.8, 0): corr 1; tag constant: 0.
        # Both groups weigh ~1 (mean A^2 = (std / (std + 1e-6))^2). PRMU is constant: 0.
        assert m["group/adv_corr/foundation"] == pytest.approx(0.0, abs=1e-4)
        assert m["group/adv_corr/tag"] == pytest.approx(-0.5, abs=1e-4)
        assert m["group/adv_corr/prmu"] == 0.0
        assert m["group/adv_corr/r_v"] == pytest.approx(0.5, abs=1e-4)  # R_v alone: (0.5, 0.5) then (1, 0)
    finally:
        D.destroy_distributed()


def test_reward_term_columns_follow_the_stage_and_the_ablations():
    from minitagpr.rewards import RewardParts
    from minitagpr.rl.loop import reward_term_columns

    parts = [RewardParts(r_v=0.5, r_f=1.0, r_rep=-0.1, r_tag=-1.0, r_prmu=0.6)] * 2
    names, cols = reward_term_columns(parts, RLConfig(stage="guided"))
    assert names == ["foundation", "tag", "prmu"]
    assert cols[0] == pytest.approx((0.8 * 0.4,) * 2) and cols[1] == (-0.8, -0.8)
    assert cols[2] == pytest.approx((0.12,) * 2)
    # an ablation's term is always 0: it is left out (its correlation with the advantages would read "no relation")
    names, cols = reward_term_columns(parts, RLConfig(stage="guided", use_tag_reward=False, use_prmu=False))
    assert names == ["foundation"] and cols == [pytest.approx((0.8 * 0.4,) * 2)]
    names, cols = reward_term_columns(parts, RLConfig(stage="guided", gamma=0.0))
    assert names == ["foundation", "tag"] and cols[1] == (-0.8, -0.8)
    names, cols = reward_term_columns(parts, RLConfig(stage="exploratory"))
    assert names == ["foundation"] and cols == [pytest.approx((0.4, 0.4))]  # R_foundation, unweighted
    assert reward_term_columns([], RLConfig(stage="guided"))[0] == ["foundation", "tag", "prmu"]  # a rank with none


def test_an_epoch_that_divides_evenly_gives_every_step_a_full_batch():
    for n, per_step in ((9, 3), (12, 4), (10, 5)):
        for epoch in range(2):
            steps = [prompts_for_step(epoch * (n // per_step) + s, n, per_step, seed=0) for s in range(n // per_step)]
            assert [len(s) for s in steps] == [per_step] * (n // per_step)
            assert sorted(i for s in steps for i in s) == list(range(n))  # the epoch covers each prompt once


def test_a_prompt_over_the_budget_names_its_questions_file(small_world):
    from minitagpr.data.prompts import PromptTooLongError
    from minitagpr.rl.loop import load_prompts
    from minitagpr.tokenizer import Tokenizer
    world, policy = small_world
    with pytest.raises(PromptTooLongError, match=r"LaMP_3/train/train_questions\.json: example '\d+' \(LaMP-3\): "
                                                 r"the prompt is \d+ tokens without any profile item"):
        load_prompts(RLConfig(data_root=str(world), tasks="LaMP-3:0", max_prompt_tokens=10),
                     Tokenizer.from_dir(policy))


def test_a_task_mix_asking_for_more_examples_than_the_file_has_says_so(small_world, capsys):
    from minitagpr.rl.loop import load_prompts, task_mix_sample
    from minitagpr.tokenizer import Tokenizer
    world, policy = small_world
    cfg = RLConfig(policy=str(policy), data_root=str(world), tasks="LaMP-2:1000,LaMP-3:0", k=2, max_prompt_tokens=700)
    prompts = load_prompts(cfg, Tokenizer.from_dir(policy))
    out = capsys.readouterr().out
    n2 = sum(p.task == "LaMP-2" for p in prompts)
    assert "asks for 1000 LaMP-2 examples but" in out and f"has {n2}; using all {n2}" in out
    assert "LaMP-3" not in out  # 0 = all of them, as asked: nothing to say
    # the seeded draw other recipes reuse: the same examples for a seed, another set for another seed
    items = list(range(50))
    assert task_mix_sample(items, 10, 0, "LaMP-2") == task_mix_sample(items, 10, 0, "LaMP-2")
    assert task_mix_sample(items, 10, 0, "LaMP-2") != task_mix_sample(items, 10, 1, "LaMP-2")
    assert task_mix_sample(items, 0, 0, "LaMP-2") == items == task_mix_sample(items, 80, 0, "LaMP-2")


def test_an_rl_export_from_a_hub_id_policy_carries_the_tokenizer(small_world, tmp_path):
    """The paper's "w/o SFT" row starts RL from a hub id: the export must copy the tokenizer from the id's cached
    folder (as it reads it), not from a folder named like the id."""
    import shutil
    world, policy = small_world
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-policy"
    shutil.copytree(policy, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "rl"
    args = _rl_args(world, "acme/tiny-policy", out, max_steps=1, save_every=0)
    cmd = [sys.executable, str(HERE.parent / "recipes" / "exploratory_rl.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (out / "export" / "tokenizer.json").is_file() or (out / "export" / "tokenizer_config.json").is_file()
    from minitagpr.data.prompts import recorded_style
    assert recorded_style(out / "export") == "full"  # the style it was trained with, for Stage 3 and evaluation


def test_a_wrong_prmu_path_fails_before_the_policy_loads(small_world, tmp_path, monkeypatch):
    import minitagpr.rl.loop as L
    from minitagpr.model.checkpoint import CheckpointError
    world, policy = small_world

    def policy_loaded(*args, **kwargs):
        raise AssertionError("the policy was loaded before the PRMU path was checked")

    monkeypatch.setattr(L.D, "build_sharded_causal_lm", policy_loaded)
    cfg = RLConfig(policy=str(policy), prmu=str(tmp_path / "prmu_typo"), data_root=str(world), tasks="LaMP-2:0",
                   k=2, max_prompt_tokens=700, prompts_per_step=4, num_minibatches=2, out_dir=str(tmp_path / "o"))
    try:
        with pytest.raises(CheckpointError, match="prmu_typo"):
            L.train(cfg)
    finally:
        L.D.destroy_distributed()  # train() formed a group of one before it failed


def test_a_policy_trained_with_another_prompt_style_is_refused_before_it_loads(small_world, tmp_path, monkeypatch):
    import shutil

    import minitagpr.rl.loop as L
    from minitagpr.config import ConfigError
    from minitagpr.data.prompts import TRAINING_FILE
    world, policy = small_world
    brief = tmp_path / "brief_policy"
    shutil.copytree(policy, brief)
    (brief / TRAINING_FILE).write_text('{"prompt_style": "brief"}')
    monkeypatch.setattr(L.D, "build_sharded_causal_lm", lambda *a, **kw: pytest.fail("the policy was loaded"))
    cfg = RLConfig(policy=str(brief), data_root=str(world), tasks="LaMP-2:0", k=2, max_prompt_tokens=700,
                   prompts_per_step=4, num_minibatches=2, use_prmu=False, out_dir=str(tmp_path / "o"))
    try:
        with pytest.raises(ConfigError, match=r"trained with prompt_style=brief .* pass prompt_style=brief"):
            L.train(cfg)
    finally:
        L.D.destroy_distributed()


def test_pass_flops_count_each_sequences_own_attention_and_the_head_on_response_tokens():
    """The MFU used rank 0's padded width for every token's attention (3-5% too many FLOPs in the demo)."""
    from minitagpr.model.presets import build_model, tiny_config
    from minitagpr.rl.loop import pass_flops

    model = build_model(tiny_config())
    pad = 0
    input_ids = torch.tensor([[pad, pad, 5, 6, 7], [1, 2, 3, 4, 5]])  # lengths 3 and 5
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    tokens, flops = pass_flops(model, input_ids, mask, pad)
    expected = 3 * model.flops_per_token(3, head=False) + 5 * model.flops_per_token(5, head=False) \
        + 5 * model.head_flops_per_token()
    assert tokens == 8 and flops == pytest.approx(expected)
    assert flops < 8 * model.flops_per_token(5, head=False) + 5 * model.head_flops_per_token()  # the old count


def test_the_step_log_has_the_reward_phase_and_no_sync_after_the_last_step(small_world, tmp_path):
    """reward_s (rewards with the PRMU forward, advantages, sequences) was only inside step_s; the last step, which
    syncs nothing, logged sync_s = 0 and pulled the key's mean down."""
    from minitagpr.config import parse_cli
    from minitagpr.rl import loop
    world, policy = small_world
    cfg = parse_cli(loop.RLConfig, _rl_args(world, policy, tmp_path / "t", stage="exploratory", max_steps=2,
                                            save_every=0))
    loop.train(cfg)
    first, last = _log(tmp_path / "t")
    assert first["reward_s"] > 0 and last["reward_s"] > 0
    assert "sync_s" in first and "sync_s" not in last
    assert first["rollout_s"] + first["reward_s"] + first["train_s"] + first["sync_s"] <= first["step_s"]
    for row in (first, last):
        sampled = [k.split("/", 1)[1] for k in row if k.startswith("reward_mean/")]
        assert sum(row[f"responses/{t}"] for t in sampled) == cfg.prompts_per_step * cfg.group_size
        # the built-in engine samples with an fp32 copy of the very weights the policy recomputes pi_old with
        assert row["rollout/logp_gap_mean"] < 1e-5 and row["rollout/logp_gap_max"] < 1e-4


def test_sampler_logp_gap_compares_the_engines_log_probs_at_the_response_targets():
    from minitagpr.rl.loop import make_sequences, sampler_logp_gap
    prompts = [Prompt(id="q", task="LaMP-3", user=None, ids=[5, 6, 7], gold="1", messages=[])]
    comps = [Completion([7, 8], "", [-1.0, -2.0], "stop"), Completion([], "", [], "length"),
             Completion([9], "", [-0.5], "stop")]
    _, targets, mask = make_sequences(prompts, comps, 3, pad_id=0)
    old = torch.full(mask.shape, 99.0)  # anything outside the response targets must not count
    old[mask] = torch.tensor([-1.5, -2.0, -0.25])  # row 0's two targets, then row 2's one
    gap = sampler_logp_gap(comps, old, mask, "cpu")
    assert gap == {"rollout/logp_gap_mean": pytest.approx((0.5 + 0.0 + 0.25) / 3), "rollout/logp_gap_max": 0.5}
    assert sampler_logp_gap(comps[1:2], old[1:2], mask[1:2], "cpu") == {}  # only an empty response: nothing


def test_gather_rows_hands_the_collective_a_contiguous_tensor(monkeypatch):
    """reward_metrics gathers a transposed (n, C) tensor; gloo copes with its strides, NCCL raises 'Tensors must
    be contiguous' (every multi-GPU step would have died)."""
    from types import SimpleNamespace
    from minitagpr.rl import loop
    seen = []

    def all_gather(out, t):
        seen.append(t.is_contiguous())
        for o in out:
            o.copy_(t)

    monkeypatch.setattr(loop.D, "world", lambda: SimpleNamespace(world_size=2))
    monkeypatch.setattr(loop.torch.distributed, "all_gather", all_gather)
    values = torch.arange(6, dtype=torch.float64).view(2, 3).T  # (3, 2), not contiguous, as reward_metrics builds
    got = loop.gather_rows(values, "cpu")
    assert seen == [True] and torch.equal(got, torch.cat([values, values]))


def test_a_resume_refuses_other_prompts_or_another_prmu_behind_the_same_keys(small_world, tmp_path):
    """data_root, policy and prmu are paths a resume may change (a run may move); what they hold may not: a resume
    whose task mix, PRMU weights or policy config differ from the checkpoint's is refused, a moved identical copy
    goes on."""
    import shutil
    import minitagpr.rl.loop as L
    from minitagpr.config import ConfigError
    from minitagpr.data import lamp
    from minitagpr.model import Qwen3Config
    from minitagpr.model.reward import PRMU, save_reward_model
    world, policy = small_world
    tok_files = {n: policy / n for n in ("tokenizer.json", "tokenizer_config.json")}

    def write_prmu(folder, seed):
        rm = PRMU(Qwen3Config.from_json(policy / "config.json"), ["nobody"])
        rm.init_weights(seed)
        return save_reward_model(rm, folder, extra_files=tok_files)

    prmu = write_prmu(tmp_path / "prmu", 0)
    moved_world = shutil.copytree(world, tmp_path / "moved_world")
    moved_prmu = shutil.copytree(prmu, tmp_path / "moved_prmu")
    base = dict(policy=str(policy), tasks="LaMP-2:0,LaMP-3:0", k=2, max_prompt_tokens=700, group_size=2,
                prompts_per_step=4, num_minibatches=2, micro_batch_size=4, max_new_tokens=8, save_every=2, lr=1e-3,
                out_dir=str(tmp_path / "run"))
    try:
        L.train(RLConfig(**base, prmu=str(prmu), data_root=str(world), max_steps=2))
        write_prmu(tmp_path / "other_prmu", 1)
        with pytest.raises(ConfigError, match=r"prmu=.*other_prmu holds other weights or users than the PRMU this "
                                              r"run scored with"):
            L.train(RLConfig(**base, prmu=str(tmp_path / "other_prmu"), data_root=str(world), max_steps=4))
        other_policy = shutil.copytree(policy, tmp_path / "other_policy")  # same shapes, other rope_theta
        config = json.loads((other_policy / "config.json").read_text())
        (other_policy / "config.json").write_text(json.dumps({**config, "rope_theta": config["rope_theta"] / 2}))
        with pytest.raises(ConfigError, match=r"policy= now holds a model config other than the one this run "
                                              r"trained \(rope_theta "):
            L.train(RLConfig(**{**base, "policy": str(other_policy)}, prmu=str(prmu), data_root=str(world),
                             max_steps=4))
        gold_file = lamp.split_files(moved_world, "LaMP-3", RLConfig().split, RLConfig().part)[1]
        outputs = json.loads(gold_file.read_text())
        outputs["golds"][0]["output"] = "5" if outputs["golds"][0]["output"] != "5" else "4"  # one gold changed
        changed = shutil.copytree(moved_world, tmp_path / "changed_world")
        (changed / gold_file.relative_to(moved_world)).write_text(json.dumps(outputs))
        with pytest.raises(ConfigError, match=r"the task mix differs from the one this run started with"):
            L.train(RLConfig(**base, prmu=str(moved_prmu), data_root=str(changed), max_steps=4))
        L.train(RLConfig(**base, prmu=str(moved_prmu), data_root=str(moved_world), max_steps=4))  # moved: goes on
        assert [r["step"] for r in _log(tmp_path / "run")] == [1, 2, 3, 4]
    finally:
        L.D.destroy_distributed()


def test_a_resume_refuses_a_prmu_that_now_reads_another_length(small_world, tmp_path):
    """prmu_max_len=0 resolves to the length the PRMU export records; a PRMU re-exported between a kill and the
    resume would otherwise be scored at another length without a word."""
    import minitagpr.rl.loop as L
    from minitagpr.config import ConfigError
    from minitagpr.data.prompts import TRAINING_FILE
    from minitagpr.model import Qwen3Config
    from minitagpr.model.reward import PRMU, save_reward_model
    world, policy = small_world
    rm = PRMU(Qwen3Config.from_json(policy / "config.json"), ["nobody"])
    rm.init_weights(0)
    tok_files = {n: policy / n for n in ("tokenizer.json", "tokenizer_config.json")}
    prmu = save_reward_model(rm, tmp_path / "prmu", extra_files=tok_files)
    (prmu / TRAINING_FILE).write_text('{"max_len": 512}')
    base = dict(policy=str(policy), prmu=str(prmu), data_root=str(world), tasks="LaMP-2:0,LaMP-3:0", k=2,
                max_prompt_tokens=700, group_size=2, prompts_per_step=4, num_minibatches=2, micro_batch_size=4,
                max_new_tokens=8, save_every=2, lr=1e-3, out_dir=str(tmp_path / "run"))
    try:
        L.train(RLConfig(**base, max_steps=2))
        assert all(r["prmu_inputs_cut"] == 0 for r in _log(tmp_path / "run"))
        (prmu / TRAINING_FILE).write_text('{"max_len": 256}')  # re-exported with another max_len
        with pytest.raises(ConfigError, match=r"scored R_PRMU inputs up to 512 tokens, .* now reads 256 \(as it was "
                                              r"trained\); pass prmu_max_len=512"):
            L.train(RLConfig(**base, max_steps=4))
        L.train(RLConfig(**base, max_steps=4, prmu_max_len=512))  # as it started: the run goes on
        assert [r["step"] for r in _log(tmp_path / "run")] == [1, 2, 3, 4]
    finally:
        L.D.destroy_distributed()


# ----------------------------------------------------------------------------------------------- pinned by mutation
# A second sweep (rl/loop.py, rl/gspo.py, rollout/): each test below fails on a mutant that the suite let through.

def test_every_step_and_every_prompt_of_a_step_sample_with_their_own_seed():
    """rollout_seed moves with the step and sample_base with the prompt's global position (prompt_offset + i):
    a seed shared by the steps would replay a batch position's random draws at every step, one shared by a step's
    prompts would give all of them the same draws."""
    from types import SimpleNamespace

    from minitagpr.rl.loop import rollout, rollout_seed
    from minitagpr.rollout.base import sample_base

    class Recording:
        def generate(self, prompt_token_ids, n, seed, **kwargs):
            self.seed = seed
            return [[Completion([1], "", [0.0], "stop")] * n for _ in prompt_token_ids]

    engine, seeds = Recording(), []
    for step in range(3):
        flat = rollout(engine, [_prompt([1, 2]), _prompt([3])], RLConfig(group_size=2), SimpleNamespace(stop_ids=[0]),
                       seed=rollout_seed(5, step), prompt_offset=2)
        assert len(flat) == 4
        seeds.append(engine.seed)
    assert seeds[0] == [sample_base(rollout_seed(5, 0), 2), sample_base(rollout_seed(5, 0), 3)]  # global positions
    assert len({s for step in seeds for s in step}) == 6  # every (step, prompt) its own


def test_the_logged_advantage_std_is_pooled_around_the_steps_mean():
    """gspo/adv_std is the std of every non-empty sequence's advantage in the step, from the pooled moments:
    sqrt(E[A^2] - E[A]^2), not sqrt(E[A^2]) (equal only when the advantages average to 0) nor a mean of the
    micro-batches' stds (0.5 and 1.5 here)."""
    from minitagpr import distributed as D
    from minitagpr.rl.loop import _accumulate, reduce_train_metrics

    logp, mask, sums = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), {}
    for adv in ([1.0, 2.0], [3.0, 6.0]):  # two micro-batches
        _accumulate(sums, gspo_loss(logp, logp, torch.tensor(adv), mask)[1])
    D.init_distributed()
    try:
        out = reduce_train_metrics(sums, torch.device("cpu"))
    finally:
        D.destroy_distributed()
    assert out["gspo/adv_mean"] == pytest.approx(3.0)
    assert out["gspo/adv_std"] == pytest.approx(math.sqrt(3.5))  # population std of 1, 2, 3, 6


def test_a_non_finite_gradient_norm_stops_the_update_before_the_optimizer_steps(tmp_path, monkeypatch):
    """A finite loss can come with an overflowed gradient; stepping on it would write NaN into every weight."""
    import minitagpr.rl.loop as L
    monkeypatch.setattr(L, "clip_grad_norm", lambda model, max_norm: math.inf)
    with synthetic_policy(tmp_path) as (model, input_ids, targets, mask, adv):
        before = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        cfg = RLConfig(group_size=4, num_minibatches=1, micro_batch_size=16, prompts_per_step=4, lr=1e-3)
        old = L.sequence_logprobs(model, input_ids, targets, [torch.arange(len(adv))])
        batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "old_logp": old, "advantages": adv}
        with pytest.raises(L.NonFiniteError, match=r"non-finite GSPO loss \(.*\) or gradient norm \(inf\)"):
            one_update(model, batch, cfg, cfg.lr)
        assert all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())


def test_a_non_finite_reward_on_another_rank_stops_this_rank_too(monkeypatch):
    """Every rank stops at once on the all-reduced count: a rank whose own rewards are finite raising nothing would
    wait forever in the next collective."""
    from minitagpr.rl import loop
    monkeypatch.setattr(loop.D, "all_reduce_sum", lambda t: t + 1)  # the other rank counted one
    with pytest.raises(loop.NonFiniteError, match=r"\[guided\] step 3: 1 non-finite reward\(s\), another rank"):
        loop.check_finite(torch.zeros(4, dtype=torch.float64), [_prompt([1])] * 2, 2, 3, "guided", "cpu")


def test_fractional_epochs_give_the_step_count_as_written(small_world, tmp_path, monkeypatch):
    """epochs=0.57 of 100 steps per epoch is 57 steps, though 0.57 * 100 is 56.99999999999999 in floats."""
    from minitagpr.config import parse_cli
    from minitagpr.rl import loop

    class Planned(Exception):
        pass

    def progress(total_steps, *args, **kwargs):
        raise Planned(total_steps)

    real_load = loop.load_prompts
    monkeypatch.setattr(loop, "load_prompts", lambda cfg, tok: (real_load(cfg, tok) * 7)[:100])
    monkeypatch.setattr(loop, "Progress", progress)
    world, policy = small_world
    cfg = parse_cli(loop.RLConfig, _rl_args(world, policy, tmp_path / "e", stage="exploratory", epochs=0.57,
                                            max_steps=0, prompts_per_step=1, num_minibatches=1))
    try:
        with pytest.raises(Planned) as planned:
            loop.train(cfg)
    finally:
        loop.D.destroy_distributed()
    assert planned.value.args[0] == 57


def test_the_mfu_counts_the_old_log_prob_forward_and_every_ppo_epoch(small_world, tmp_path):
    """A step's FLOPs are one training pass per PPO epoch plus the no-grad old-log-prob forward (1/3 of a pass).
    The first steps of two runs that differ in ppo_epochs only train on one batch: FLOPs in the ratio
    (1/3 + 2) / (1/3 + 1) (mfu x train_s is FLOPs / (ranks x peak), the peak the same in one process)."""
    from minitagpr.config import parse_cli
    from minitagpr.rl import loop
    world, policy = small_world
    rows = {}
    for epochs in (1, 2):
        out = tmp_path / f"e{epochs}"
        loop.train(parse_cli(loop.RLConfig, _rl_args(world, policy, out, stage="exploratory", ppo_epochs=epochs,
                                                     max_steps=1, save_every=0)))
        rows[epochs] = _log(out)[0]
    assert rows[1]["batch_digest"] == rows[2]["batch_digest"]
    flops = {e: r["mfu"] * r["train_s"] for e, r in rows.items()}
    assert flops[2] / flops[1] == pytest.approx((1 / 3 + 2) / (1 / 3 + 1), rel=1e-9)
