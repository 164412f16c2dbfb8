"""recipes/sft.py end to end on tiny inputs: 1 vs 2 processes, gradient accumulation, crash + resume, bad inputs.

All runs share one tiny setup: 48 synthetic chains packed into 24 rows of 128 tokens, global batch 8 rows
(3 steps per epoch), 2 epochs = 6 steps, a 2-layer random Qwen3 with a tied head. The reference runs are made once
per module and compared by several tests.
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minitagpr.distributed import latest_checkpoint
from train_fixtures import REPO, grad_norms, launch, launch_sequence, losses, make_inputs


def recipe():
    """recipes/sft.py as a module (recipes/ is a folder of scripts, not a package)."""
    if "sft_recipe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sft_recipe", REPO / "recipes" / "sft.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["sft_recipe"] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["sft_recipe"]


def run_in_process(args):
    """A one-process run inside pytest (a process group of one; saves a launch)."""
    sft = recipe()
    try:
        sft.run(sft.parse_cli(sft.SftConfig, args))
    finally:
        sft.D.destroy_distributed()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("sft_inputs"))


def common(inputs, out_dir, **overrides):
    args = {"model": inputs["model"], "tokenizer": inputs["tokenizer"], "data": inputs["data"], "out_dir": out_dir,
            "seq_len": 128, "pack": True, "global_batch": 8, "epochs": 2, "lr": 1e-3, "warmup_ratio": 0.2, "eval_holdout": 0}
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items()]


def ok(proc):
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def weights(out_dir):
    return load_file(str(out_dir / "hf" / "model.safetensors"))


def assert_losses_close(a, b, rel):
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (s, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=rel), f"step {s}: {x} vs {y}"


def assert_weights_close(a, b, rel):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rel, atol=rel * a[name].abs().max().item(), msg=name)


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """one: 1 process (in this pytest process) x 1 micro-batch of 8 rows; two: 2 processes x 1 micro-batch of 4
    rows; accum: 2 processes x 4 micro-batches of 1 row."""
    root = tmp_path_factory.mktemp("sft_runs")
    out = {"one": root / "one", "two": root / "two", "accum": root / "accum"}
    run_in_process(common(inputs, out["one"], micro_batch=8, plot=False))
    ok(launch_sequence([common(inputs, out["two"], micro_batch=4, save_every=3, keep_last=1),
                        common(inputs, out["accum"], micro_batch=1, plot=False)], nproc=2))
    return out


def test_the_tiny_run_learns(runs):
    ls = [x for _, x in losses(runs["two"])]
    assert ls[-1] < 0.9 * ls[0]


def test_one_and_two_processes_give_the_same_losses_and_weights(runs):
    assert_losses_close(losses(runs["two"]), losses(runs["one"]), rel=1e-4)
    assert_weights_close(weights(runs["two"]), weights(runs["one"]), rel=1e-4)
    assert grad_norms(runs["two"]) == pytest.approx(grad_norms(runs["one"]), rel=1e-4)


def test_gradient_accumulation_1_and_4_give_the_same_losses_and_weights(runs):
    assert_losses_close(losses(runs["accum"]), losses(runs["two"]), rel=1e-4)
    assert_weights_close(weights(runs["accum"]), weights(runs["two"]), rel=1e-4)
    assert grad_norms(runs["accum"]) == pytest.approx(grad_norms(runs["two"]), rel=1e-4)


def step_target_counts(inputs, world_size, micro_batch):
    """Per optimizer step, the valid-target counts [rank][micro-batch] of the `runs` fixture's run with this layout,
    found as recipes/sft.py finds its rows (held-out split, tokenize, pack, rows_for_step, rank_slice,
    micro_batches), without launching it."""
    from minitagpr.tokenizer import Tokenizer
    from minitagpr.train import sft_data as S

    sft = recipe()
    cfg = sft.parse_cli(sft.SftConfig, common(inputs, "unused", micro_batch=micro_batch))
    tokenizer = Tokenizer.from_dir(cfg.tokenizer)
    records, _ = sft.split_heldout(S.read_sft_records(cfg.data), cfg.eval_holdout, cfg.seed, cfg.data)
    rows = S.pack_documents(S.tokenize_records(records, tokenizer, cfg.data), cfg.seq_len, tokenizer.pad_id,
                            pack=cfg.pack, shuffle_seed=cfg.seed, truncate_long=cfg.truncate_long)
    valid = (rows.targets != S.IGNORE_INDEX).sum(dim=1).tolist()  # (R,) targets per packed row
    steps = cfg.epochs * S.steps_per_epoch(rows.num_rows, cfg.global_batch)
    assert steps == 6  # the runs' length (assert_losses_close)
    out = []
    for step in range(steps):
        batch = S.rows_for_step(step, rows.num_rows, cfg.global_batch, cfg.seed)
        out.append([[sum(valid[r] for r in mb) for mb in S.micro_batches(S.rank_slice(batch, rank, world_size),
                                                                           micro_batch)]
                    for rank in range(world_size)])
    return out


def test_ranks_and_micro_batches_hold_unequal_target_counts(inputs):
    # otherwise a per-rank or per-micro-batch mean would equal the global one and the two tests above could not
    # tell them apart: at every step the "two" run's 2 ranks, and the "accum" run's micro-batches, hold unequal
    # target counts (varied words per record are not enough: equal token counts per row would make them equal)
    for step, (rank0, rank1) in enumerate(step_target_counts(inputs, world_size=2, micro_batch=4)):
        assert sum(rank0) != sum(rank1), f"step {step + 1}: both ranks hold {sum(rank0)} targets"
    for step, ranks in enumerate(step_target_counts(inputs, world_size=2, micro_batch=1)):
        assert [len(rank) for rank in ranks] == [4, 4]
        assert all(len(set(rank)) > 1 for rank in ranks), f"step {step + 1}: micro-batches {ranks}"


def test_only_the_last_k_checkpoints_are_kept(runs):
    ckpts = sorted(p.name for p in (runs["two"] / "checkpoints").iterdir())
    assert ckpts == ["step_000006"]
    state = json.loads((runs["two"] / "checkpoints" / "step_000006" / "state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2


def test_sigkill_during_a_save_then_resume_continues_exactly(runs, inputs, tmp_path):
    out = tmp_path / "killed"
    args = common(inputs, out, micro_batch=4, save_every=3, plot=False)
    # Both ranks die (SIGKILL) while writing the checkpoint of step 6, after the one of step 3 (an epoch boundary):
    # steps 3-5 ran after that checkpoint, so they are lost and must be redone exactly once.
    killed = launch(args, nproc=2, env={"MINITAGPR_FAULT": "save:6"})
    assert killed.returncode != 0
    assert [s for s, _ in losses(out)] == list(range(1, 7))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_000003", "step_000006.tmp"]  # the half-written save never got its final name
    assert latest_checkpoint(out / "checkpoints").name == "step_000003"
    resumed = ok(launch(args, nproc=2))
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    # the log holds every step exactly once, and the sequence equals the uninterrupted run's
    assert_losses_close(losses(out), losses(runs["two"]), rel=1e-6)
    assert_weights_close(weights(out), weights(runs["two"]), rel=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000006"]


def test_resume_false_starts_over_without_the_earlier_runs_checkpoints(inputs, tmp_path, capsys):
    # the earlier run's step_000004 outnumbers the new run's steps: were it kept, keep_last pruning would drop the
    # new checkpoints in its favour and the next default (resume=true) restart would continue the earlier run
    out = tmp_path / "restarted"
    run_in_process(common(inputs, out, micro_batch=8, max_steps=4, save_every=2, keep_last=1, plot=True,
                          eval_holdout=4, eval_max_new_tokens=4))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004"]
    assert (out / "eval.json").is_file() and (out / "metrics.png").is_file()
    capsys.readouterr()
    run_in_process(common(inputs, out, micro_batch=8, max_steps=2, save_every=1, keep_last=2, plot=False,
                          resume=False))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert "[sft] resume=false: removed the earlier run's checkpoints" in capsys.readouterr().out
    assert [s for s, _ in losses(out)] == [1, 2]
    # this run makes no held-out check and no plot: the earlier run's are not left to describe it
    assert not (out / "eval.json").exists() and not (out / "metrics.png").exists()


def test_export_loads_in_transformers_with_the_same_log_probs(runs):
    transformers = pytest.importorskip("transformers")
    from minitagpr.model import load_pretrained
    hf_dir = runs["one"] / "hf"
    ours = load_pretrained(hf_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(theirs(ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        logp, _ = ours(ids, targets=torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1))
    torch.testing.assert_close(logp[:, :-1], ref, rtol=1e-4, atol=1e-4)
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "tokenizer_config.json").is_file()


def test_metrics_lines_carry_the_documented_fields(runs):
    rec = json.loads((runs["two"] / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "target_tokens"):
        assert key in rec
    steps = [json.loads(line)["step"] for line in (runs["two"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and rec["epoch"] == 0  # completed steps, as PRMU and RL log them
    assert (runs["two"] / "metrics.png").stat().st_size > 1000
    # the schedule by hand: 6 steps, warmup round(0.2 x 6) = 1 step, cosine from lr to 0.1 lr over steps 1..5
    import math
    by_hand = [1.0, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)] + [0.1]
    lrs = [json.loads(line)["lr"] for line in (runs["two"] / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3 * m for m in by_hand])


def test_tokens_per_s_counts_real_tokens_not_the_padding_of_a_micro_batch(inputs, tmp_path):
    """pack=false and one micro-batch of 8 rows of unequal length: the micro-batch pads its shorter rows to the
    longest, and those slots are no tokens (tokens_per_s counted them; RL and PRMU count real tokens only)."""
    sft = recipe()
    from minitagpr.tokenizer import Tokenizer
    out = tmp_path / "unpacked"
    run_in_process(common(inputs, out, pack=False, micro_batch=8, max_steps=1))
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    docs = sft.S.tokenize_records(sft.S.read_sft_records(inputs["data"]), Tokenizer.from_dir(inputs["tokenizer"]))
    rows = sft.S.pack_documents(docs, 128, 0, pack=False, shuffle_seed=0)
    step_rows = sft.S.rows_for_step(0, rows.num_rows, 8, 0)
    lengths = [int(rows.lengths[r]) for r in step_rows]
    assert len(set(lengths)) > 1  # unequal rows: some padding in the micro-batch
    assert rec["tokens"] == sum(lengths) < rec["token_slots"] == 8 * max(lengths)
    assert rec["tokens_per_s"] == pytest.approx(rec["tokens"] / rec["step_time_s"])


# ----------------------------------------------------------------------------------------------- bad inputs
def test_held_out_records_never_train(inputs, tmp_path, capsys):
    """The eval_holdout records are left out of the documents that are packed into training rows (tokenizing every
    record for training, held-out ones included, passed every other test)."""
    sft = recipe()
    records = sft.S.read_sft_records(Path(inputs["data"]))
    held_prompts = {json.dumps(r.messages) for r in sft.split_heldout(records, 4, 0, inputs["data"])[1]}
    trained = [r for r in records if json.dumps(r.messages) not in held_prompts]  # twins of held-out prompts too
    assert len(trained) < len(records) - 4  # the fixture repeats prompts
    run_in_process(common(inputs, tmp_path / "held", micro_batch=8, max_steps=1, eval_holdout=4,
                          eval_max_new_tokens=2))  # seed=0, the default
    assert f"[sft] {len(trained)} documents (4 held out) -> " in capsys.readouterr().out


@pytest.mark.parametrize("grad_clip", [0.0, 1e-12])
def test_the_step_clips_the_gradient_norm_to_grad_clip(inputs, tmp_path, grad_clip):
    """A norm clipped to 1e-12 leaves each gradient entry far below Adam's eps (1e-8): the first step moves no weight
    by more than about 1e-4 x lr. Unclipped, Adam's first step moves weights by about lr (and so would a loop that
    skips the clipping, whatever grad_clip says)."""
    lr = 1e-3
    out = tmp_path / f"clip{grad_clip}"
    run_in_process(common(inputs, out, micro_batch=8, max_steps=1, warmup_ratio=0.0, lr=lr, grad_clip=grad_clip))
    before = load_file(str(Path(inputs["model"]) / "model.safetensors"))
    after = weights(out)
    moved = max((after[n].float() - before[n].float()).abs().max().item() for n in after)
    assert grad_norms(out)[0] > 1e-3  # the norm before clipping is logged either way
    if grad_clip:
        assert moved < 2e-4 * lr, moved
    else:
        assert moved > 0.5 * lr, moved


def test_unknown_config_key_fails_with_a_suggestion(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe().main(common(inputs, tmp_path / "x") + ["global_bacth=4"])
    assert exit_.value.code == 1
    assert "unknown config key 'global_bacth' (from command line); did you mean 'global_batch'?" in capsys.readouterr().err


def test_missing_data_file_fails_clearly(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe().main(common(inputs, tmp_path / "x", data=tmp_path / "missing.jsonl"))
    assert exit_.value.code == 1
    assert f"SFT data file {tmp_path / 'missing.jsonl'}: file not found" in capsys.readouterr().err


def write_data_with_a_long_record(path):
    """Three records; the second, 'long-one', is longer than seq_len=128 (its chain alone is 240 words)."""
    from train_fixtures import sft_record
    long = dict(sft_record(1), id="long-one",
                chain="<analyze_input>" + "the user likes jazz " * 60 + "</analyze_input>")
    path.write_text("".join(json.dumps(r) + "\n" for r in [sft_record(0), long, sft_record(2)]))
    return path


def test_a_record_longer_than_seq_len_stops_the_run_naming_file_record_and_lengths(inputs, tmp_path, capsys):
    """Before, it was cut to seq_len and only counted in the log: SFT trained on a chain with no </think>, no answer
    and no <|im_end|>."""
    data = write_data_with_a_long_record(tmp_path / "long.jsonl")
    with pytest.raises(SystemExit) as exit_:
        recipe().main(common(inputs, tmp_path / "x", data=data, global_batch=1, max_steps=1, plot=False))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"1 of 3 documents are longer than seq_len=128 tokens; the first: {data}:2 (record id 'long-one'): " in err
    assert "tokens = prompt " in err and "truncate_long=true" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "checkpoints").exists()  # stopped before training


def test_a_bad_held_out_record_is_named_before_training(inputs, tmp_path, capsys):
    """Held-out records were only rendered by the check after training (a plain ValueError on one rank)."""
    from train_fixtures import sft_record
    records = [sft_record(i) for i in range(8)]
    data = tmp_path / "bad_heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    sft = recipe()
    _, heldout = sft.split_heldout(sft.S.read_sft_records(data), 2, 0, data)  # seed=0 is the config default
    bad = int(heldout[0].id[1:])
    records[bad]["messages"] = [{"role": "developer", "content": "be brief"}] + records[bad]["messages"]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SystemExit) as exit_:
        sft.main(common(inputs, tmp_path / "x", data=data, global_batch=1, max_steps=1, plot=False,
                        eval_holdout=2, seed=0))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"{data}:{bad + 1} (record id 'r{bad}'): cannot tokenize: " in err and "'developer'" in err
    assert not (tmp_path / "x" / "checkpoints").exists()  # stopped before training


def test_held_out_prompts_never_train_through_a_second_chain_of_the_same_prompt():
    """Stage 0 keeps up to max_per_instance chains per prompt; records were held out one by one, so a held-out
    prompt's twin trained and the check scored a prompt the model had seen."""
    sft = recipe()
    S = sft.S

    def rec(i, prompt):
        return S.SftRecord(id=f"r{i}", user=None, task="LaMP-3", line=i + 1, chain=f"c{i}", answer="3",
                           messages=[{"role": "user", "content": f"prompt {prompt}"}])
    records = [rec(i, i // 2) for i in range(12)]  # six prompts, two chains each
    for seed in range(5):
        train, held = sft.split_heldout(records, 2, seed, "x.jsonl")
        held_prompts = {r.messages[0]["content"] for r in held}
        assert len(held) == 2 and len(held_prompts) == 2  # n counts prompts, each decoded once
        assert not held_prompts & {r.messages[0]["content"] for r in train}
        assert len(train) == 8 and [r.line for r in train] == sorted(r.line for r in train)  # file order
    with pytest.raises(sft.ConfigError, match=r"eval_holdout=6 leaves no training records .*\(6 distinct prompts\)"):
        sft.split_heldout(records, 6, 0, "x.jsonl")
    # distinct prompts (the demo's): the same records as the record-wise seeded choice
    single = [rec(i, i) for i in range(10)]
    order = list(range(10))
    random.Random(3 + 17).shuffle(order)
    assert [r.id for r in sft.split_heldout(single, 3, 3, "x.jsonl")[1]] == [f"r{i}" for i in sorted(order[:3])]


def test_a_demo_base_of_another_seed_is_refused_not_trained_from(tmp_path):
    """seed= is the demo base's random init, but an existing base was reused whatever seed built it."""
    from types import SimpleNamespace
    from train_fixtures import write_tokenizer
    sft = recipe()
    world = SimpleNamespace(tokenizer_dir=write_tokenizer(tmp_path / "tok"))
    cfg = sft.SftConfig(demo_dir=str(tmp_path / "demo"), seed=0)
    base = sft.ensure_demo_base(cfg, world)
    assert json.loads((base / "demo_base.json").read_text()) == {"preset": cfg.demo_preset, "seed": 0}
    assert sft.ensure_demo_base(cfg, world) == base  # the same seed: reused
    with pytest.raises(sft.ConfigError, match=rf"{base} is the demo base model of seed 0, this run has seed=1"):
        sft.ensure_demo_base(sft.SftConfig(demo_dir=str(tmp_path / "demo"), seed=1), world)
    (base / "demo_base.json").write_text("[0]")
    with pytest.raises(sft.ConfigError, match=r"demo_base.json: unreadable record of the demo base's seed"):
        sft.ensure_demo_base(cfg, world)


def test_truncate_long_cuts_instead_and_is_a_plumbing_key(inputs, tmp_path, capsys):
    sft = recipe()
    data = write_data_with_a_long_record(tmp_path / "long.jsonl")
    run_in_process(common(inputs, tmp_path / "x", data=data, global_batch=1, max_steps=1, plot=False,
                          truncate_long=True))
    assert "(1 truncated to seq_len by truncate_long" in capsys.readouterr().out
    assert "truncate_long" in sft.RESUMABLE_KEYS  # a resume may change it (the data fingerprint guards a resume)


def test_drop_long_leaves_long_records_out_and_lists_them(inputs, tmp_path, capsys):
    sft = recipe()
    data = write_data_with_a_long_record(tmp_path / "long.jsonl")
    run_in_process(common(inputs, tmp_path / "x", data=data, global_batch=1, max_steps=1, plot=False,
                          drop_long=True))
    out = capsys.readouterr().out
    assert "drop_long: 1 of 3 training records are longer than seq_len=128 tokens and left out" in out
    assert "2 documents (0 held out)" in out and "(0 truncated" in out
    listed = json.loads((tmp_path / "x" / "dropped_long.json").read_text())
    assert [(r["id"], r["where"], r["seq_len"]) for r in listed] == [("long-one", f"{data}:2", 128)]
    assert listed[0]["tokens"] > 128
    assert "drop_long" in sft.RESUMABLE_KEYS  # plumbing, like truncate_long (the data fingerprint guards a resume)
    # a rerun that stops (here: the long record without drop_long) leaves the trained run's list in place
    with pytest.raises(SystemExit) as exit_:
        sft.main(common(inputs, tmp_path / "x", data=data, global_batch=1, max_steps=1, plot=False))
    assert exit_.value.code == 1
    long_record = f"1 of 3 documents are longer than seq_len=128 tokens; the first: {data}:2 (record id 'long-one'): "
    assert long_record in capsys.readouterr().err  # the long record stopped it, not another check of the rerun
    assert json.loads((tmp_path / "x" / "dropped_long.json").read_text()) == listed


def test_drop_long_with_every_record_too_long_and_with_truncate_long_are_refused(inputs, tmp_path, capsys):
    data = write_data_with_a_long_record(tmp_path / "long.jsonl")
    for overrides, message in (({"seq_len": 4}, "all 3 training records are longer than seq_len=4 tokens"),
                                ({"truncate_long": True}, "truncate_long=true cuts the records")):
        with pytest.raises(SystemExit) as exit_:
            recipe().main(common(inputs, tmp_path / "x", data=data, global_batch=1, max_steps=1, plot=False,
                                 drop_long=True, **overrides))
        assert exit_.value.code == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_non_finite_loss_stops_with_the_step(inputs, tmp_path, capsys):
    # an absurd learning rate blows the weights up in one step; step 1 must stop before the optimizer step
    with pytest.raises(SystemExit) as exit_:
        recipe().main(common(inputs, tmp_path / "x", lr=1e30, grad_clip=0, max_steps=3, warmup_ratio=0,
                             micro_batch=8, plot=False))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "[sft] error: non-finite" in err and "at step 2; stopping before its optimizer step" in err
    assert [s for s, _ in losses(tmp_path / "x")] == [1]


def test_resume_refuses_another_learning_rate_or_schedule_but_not_plumbing(inputs, tmp_path):
    from minitagpr.config import ConfigError
    out = tmp_path / "r"
    run_in_process(common(inputs, out, max_steps=2, save_every=1, plot=False))
    record = (out / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"resuming with settings that differ.*lr 0\.001 -> 0\.002"):
        run_in_process(common(inputs, out, max_steps=2, lr=2e-3, plot=False))
    assert (out / "config.yaml").read_bytes() == record  # a refused resume leaves the run's record alone
    with pytest.raises(ConfigError, match=r"max_steps 2 -> 3"):  # warmup and cosine are ratios of the length
        run_in_process(common(inputs, out, max_steps=3, plot=False))
    run_in_process(common(inputs, out, max_steps=2, keep_last=1, micro_batch=2, plot=False))  # plumbing resumes


@pytest.mark.parametrize("setting, message", [
    ("min_lr_ratio=nan", r"min_lr_ratio must be a finite number in \[0, 1\]"),
    ("warmup_ratio=1.5", r"warmup_ratio must be a finite number in \[0, 1\]"),
    ("grad_clip=-1", "grad_clip must be a finite number >= 0"), ("betas=[0.9,1.5]", r"betas must be two numbers")])
def test_optimizer_settings_outside_their_range_are_refused_by_name(setting, message):
    from minitagpr.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        recipe().parse_cli(recipe().SftConfig, [setting])


def test_a_resume_shorter_than_the_checkpoint_is_refused(inputs, tmp_path):
    """Under a constant schedule the length may change on resume, but not below the step already trained: the run
    trained nothing and exported the 4-step weights as a 2-step run (pinned 2026-11-29)."""
    from minitagpr.config import ConfigError
    out = tmp_path / "r"
    const = dict(warmup_ratio=0, min_lr_ratio=1.0, plot=False)
    run_in_process(common(inputs, out, max_steps=4, save_every=2, **const))
    with pytest.raises(ConfigError, match=r"already trained 4 steps but is now set to 2"):
        run_in_process(common(inputs, out, max_steps=2, **const))
    run_in_process(common(inputs, out, max_steps=5, **const))  # longer is fine under a constant lr
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]  # the fifth step was trained, each step logged once


def test_resume_refuses_a_model_whose_config_changed_under_the_same_path(inputs, tmp_path):
    """model= is a path a resume may change; a same-shaped model with another rope_theta loaded the checkpoint's
    weights without a word and trained on with other maths (pinned 2026-11-29)."""
    import shutil
    from minitagpr.config import ConfigError
    out = tmp_path / "r"
    moved = shutil.copytree(inputs["model"], tmp_path / "moved")
    run_in_process(common(inputs, out, max_steps=2, save_every=1, plot=False))
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "rope_theta": config["rope_theta"] * 2}))
    with pytest.raises(ConfigError, match=r"model= now holds a model config other than the one this run trained "
                                          r"\(rope_theta 10000\.0 -> 20000\.0\)"):
        run_in_process(common(inputs, out, model=moved, max_steps=2, plot=False))
    # another shape (a third layer): the resume checks run before the weights load, so the run is told what changed,
    # not that the checkpoint is damaged and should be deleted (a shape mismatch in the load said that)
    from minitagpr.model import presets
    deeper = presets.make_tiny_checkpoint(tmp_path / "deeper", preset="tiny", seed=0, tokenizer_dir=inputs["tokenizer"],
                                          num_hidden_layers=3)
    with pytest.raises(ConfigError, match=r"model= now holds a model config other than the one this run trained "
                                          r"\(num_hidden_layers 2 -> 3\)"):
        run_in_process(common(inputs, out, model=deeper, max_steps=2, plot=False))
    run_in_process(common(inputs, out, model=inputs["model"], max_steps=2, plot=False))  # its own model goes on


def test_resume_refuses_other_records_with_the_same_row_count(inputs, tmp_path):
    """The data signature held only counts and settings: a changed file with as many rows resumed mid-epoch with
    another record behind every data index."""
    from minitagpr.config import ConfigError
    out = tmp_path / "r"
    run_in_process(common(inputs, out, max_steps=1, save_every=1, plot=False, pack=False))  # one row per record
    lines = Path(inputs["data"]).read_text().splitlines()
    changed = tmp_path / "changed.jsonl"
    edited = []
    for line in lines:
        record = json.loads(line)
        record["answer"] = record["answer"] + " again"  # same records, other targets: a few more tokens each
        edited.append(json.dumps(record))
    changed.write_text("\n".join(edited) + "\n")
    with pytest.raises(ConfigError, match=r"was written for data .*'fingerprint'") as err:
        run_in_process(common(inputs, out, data=changed, max_steps=2, plot=False, pack=False))
    assert str(err.value).count("'num_rows': 48,") == 2  # the counts agree: only the fingerprint tells


def test_the_export_records_the_one_prompt_style_its_records_were_rendered_in():
    from types import SimpleNamespace

    from minitagpr.data.lamp import LampExample
    from minitagpr.data.prompts import build_messages
    ex = LampExample(id="1", task="LaMP-3", input="review: fine", profile=[])
    rec = lambda style: SimpleNamespace(task="LaMP-3", messages=build_messages(ex, [], style=style))  # noqa: E731
    trained_style = recipe().trained_style
    assert trained_style([rec("brief"), rec("brief")]) == {"prompt_style": "brief"}
    assert trained_style([rec("brief"), rec("full")]) is None  # mixed: nothing to hold later stages to
    assert trained_style([SimpleNamespace(task="LaMP-3", messages=[{"role": "user", "content": "x"}])]) is None
