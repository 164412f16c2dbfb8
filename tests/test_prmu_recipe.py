"""recipes/train_prmu.py under torchrun: 1 vs 2 processes, resume after a kill, the export, and clear errors.

Tiny sizes throughout (a 320-token BPE, the "tiny" Qwen3 preset, 4-6 steps), so the whole file runs in well under
a minute on 2 CPU cores.
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minitagpr.config import ConfigError
from minitagpr.data.preferences import PreferenceDataError, PreferencePair, Response, format_response, read_pairs, write_pairs
from minitagpr.model.presets import make_tiny_checkpoint
from minitagpr.model.reward import PRMUScorer, load_reward_model
from minitagpr.train.loss import NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "train_prmu.py"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TAGS = ["<analyze_input>", "</analyze_input>", "<examine_examples>", "</examine_examples>", "<make_decision>",
        "</make_decision>"]
WORDS = ["comedy", "action", "drama", "horror", "profile", "says", "user", "likes", "no", "information", "pick",
         "a", "tag", "for", "this", "movie", "question"]


def _write_tokenizer(folder: Path) -> Path:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS + TAGS)] * 8, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "pad_token": "<|endoftext|>"}))
    return folder


def _pairs(n_queries=24):
    """PRP: a chain that reads the profile beats one that cannot; PQP: the user's genre beats another genre."""
    pairs = []
    genres = ["comedy", "action", "drama", "horror"]
    for i in range(n_queries):
        user = f"u{i % 4}"
        liked, other = genres[i % 4], genres[(i + 1) % 4]
        prompt = [{"role": "user", "content": f"profile says user likes {liked} . pick a tag for this movie"}]
        prp = ("<examine_examples>profile says " + liked + "</examine_examples>", "<analyze_input>no information"
               "</analyze_input>")
        pqp = ("<make_decision>" + liked + "</make_decision>", "<make_decision>" + other + "</make_decision>")
        for set_name, (c, r), (a, b) in (("PRP", prp, (liked, other)), ("PQP", pqp, (liked, other))):
            pairs.append(PreferencePair(
                id=f"{set_name}/{i}", set=set_name, source="synthetic", user=user, task="LaMP-2",
                example_id=f"q{i}", prompt=prompt, chosen=Response(format_response(c, a), c, a),
                rejected=Response(format_response(r, b), r, b), user_dependent=i % 3 == 0))
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prmu_recipe")
    tok_dir = _write_tokenizer(root / "tok")
    make_tiny_checkpoint(root / "lm", tokenizer_dir=tok_dir, seed=1)
    write_pairs(root / "pairs.jsonl", _pairs())
    return root


def _args(root: Path, out: str, **over):
    args = {"pairs": root / "pairs.jsonl", "init": root / "lm", "new_head": "true", "out_dir": root / out,
            "global_batch": 8, "micro_batch": 2, "epochs": 1, "lr": 1e-3, "table_lr": 1e-2, "warmup_steps": 1,
            "eval_every": 2, "save_every": 2, "heldout_frac": 0.25, "max_len": 96}
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def _run(nproc: int, args: list[str], env_extra=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if nproc == 1:
        cmd = [sys.executable, str(RECIPE)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(RECIPE)]
    proc = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def two_proc_run(setup):
    _run(2, _args(setup, "two"))
    return setup / "two"


@pytest.fixture(scope="module")
def one_proc_run(setup):
    _run(1, _args(setup, "one"))
    return setup / "one"


def test_one_and_two_processes_give_the_same_losses_and_weights(setup, one_proc_run, two_proc_run):
    one, two = _losses(one_proc_run), _losses(two_proc_run)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]  # 36 training pairs // global batch 8
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-4 * abs(one[step]), (step, one[step], two[step])
    a, b = load_reward_model(one_proc_run / "hf"), load_reward_model(two_proc_run / "hf")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), n


def test_training_lowers_the_loss_and_exports_a_scorable_model(setup, two_proc_run):
    losses = _losses(two_proc_run)
    assert losses[max(losses)] < losses[1]
    final = json.loads((two_proc_run / "final_eval.json").read_text())
    held = read_pairs(two_proc_run / "pairs" / "heldout.jsonl")
    scorer = PRMUScorer.from_pretrained(two_proc_run / "hf")
    assert scorer.model.users.users == ["u0", "u1", "u2", "u3"]
    assert scorer.max_len == 96  # scored with the max_len it was trained with (recorded in the export)
    r_pos = scorer.score([p.user for p in held], [p.prompt for p in held], [p.chosen.text for p in held])
    r_neg = scorer.score([p.user for p in held], [p.prompt for p in held], [p.rejected.text for p in held])
    acc = sum(a > b for a, b in zip(r_pos, r_neg)) / len(held)
    assert acc == pytest.approx(final["all_acc"])  # the exported model ranks the held-out pairs as the run did
    # the direction of learning: chosen above rejected on the pairs it trained on (a Bradley-Terry loss with its
    # arguments swapped also lowers the loss, and agrees across process counts, but ranks them the other way)
    train = read_pairs(two_proc_run / "pairs" / "train.jsonl")
    users, prompts = [p.user for p in train], [p.prompt for p in train]
    margins = [a - b for a, b in zip(scorer.score(users, prompts, [p.chosen.text for p in train]),
                                     scorer.score(users, prompts, [p.rejected.text for p in train]))]
    assert sum(m > 0 for m in margins) > 0.75 * len(train), sorted(margins)


def test_resume_after_a_kill_repeats_the_uninterrupted_losses(setup, one_proc_run):
    # the process is SIGKILLed in the middle of the step-4 save: step_000002 is the newest complete checkpoint
    died = _run(1, _args(setup, "killed"), env_extra={"MINITAGPR_FAULT": "save:4"}, check=False)
    assert died.returncode != 0
    assert (setup / "killed" / "checkpoints" / "step_000002").is_dir()
    _run(1, _args(setup, "killed"))
    resumed, ref = _losses(setup / "killed"), _losses(one_proc_run)
    assert sorted(resumed) == sorted(ref)  # each step logged exactly once
    for step in ref:
        assert abs(resumed[step] - ref[step]) <= 1e-6 * abs(ref[step]), (step, resumed[step], ref[step])


def test_resume_false_starts_over_without_the_earlier_runs_checkpoints(setup, capsys):
    # the earlier run's step_000003 outnumbers the new run's steps: were it kept, keep_last pruning would drop the
    # new checkpoints in its favour and the next default (resume=true) restart would continue the earlier run
    out = setup / "restarted"
    _run_in_process(_import_recipe(), _args(setup, "restarted", max_steps=3, save_every=1, keep_last=1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003"]
    capsys.readouterr()
    _run_in_process(_import_recipe(), _args(setup, "restarted", max_steps=2, save_every=1, keep_last=2,
                                            resume="false"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert "[prmu] resume=false: removed the earlier run's checkpoints" in capsys.readouterr().out
    assert sorted(_losses(out)) == [1, 2]


def test_release_memory_frees_the_trained_model(setup, monkeypatch):
    """run() ends with `del model, optimizer; release_memory()` (a caller's next stage loads in the same process):
    no local left behind -- a micro-batch's scores or loss, whose graph reaches every parameter -- may keep the
    sharded weights alive."""
    recipe = _import_recipe()
    build_optimizer, release_memory = recipe.build_optimizer, recipe.D.release_memory
    params, alive = [], []

    def recording_build_optimizer(model, *args, **kwargs):
        params.extend(weakref.ref(p) for p in model.parameters())
        return build_optimizer(model, *args, **kwargs)

    def counting_release_memory():
        release_memory()
        alive.append(sum(ref() is not None for ref in params))

    monkeypatch.setattr(recipe, "build_optimizer", recording_build_optimizer)
    monkeypatch.setattr(recipe.D, "release_memory", counting_release_memory)
    _run_in_process(recipe, _args(setup, "released", max_steps=1, global_batch=2, save_every=0))
    assert params and alive == [0], f"{alive} of {len(params)} parameters alive after release_memory()"


def test_a_non_finite_gradient_stops_before_the_optimizer_step(setup, monkeypatch):
    # from step 1 on the loss keeps its value but its gradient is NaN: d sqrt(u)/du is infinite at u = 0, and 0 * inf
    # is NaN; only the gradient norm can catch it
    recipe = _import_recipe()
    bradley_terry_loss, calls = recipe.bradley_terry_loss, 0

    def loss_with_a_nan_gradient_after_step_0(f_pos, f_neg, num_pairs):  # one micro-batch per step here
        nonlocal calls
        calls += 1
        loss = bradley_terry_loss(f_pos, f_neg, num_pairs)
        return loss if calls == 1 else loss + 0.0 * (f_pos - f_pos).sum().sqrt()

    monkeypatch.setattr(recipe, "bradley_terry_loss", loss_with_a_nan_gradient_after_step_0)
    out = setup / "nan_grad"
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \(nan\) at step 2; stopping before the "
                                                 r"optimizer step"):
        _run_in_process(recipe, _args(setup, "nan_grad", max_steps=3, global_batch=2, save_every=1))
    assert sorted(_losses(out)) == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]  # the last good step's


def test_an_empty_preference_file_stops_with_its_name(setup, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    proc = _run(1, _args(setup, "bad", pairs=tmp_path / "empty.jsonl"), check=False)
    assert proc.returncode == 1
    assert "empty.jsonl: empty preference set" in proc.stderr and "Traceback" not in proc.stderr


def test_a_malformed_pair_stops_with_file_and_line(setup, tmp_path):
    lines = (setup / "pairs.jsonl").read_text().splitlines()
    bad = json.loads(lines[2])
    del bad["rejected"]["text"]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:2] + [json.dumps(bad)]) + "\n")
    recipe = _import_recipe()
    cfg = recipe.PrmuConfig(pairs=[str(tmp_path / "bad.jsonl")])
    with pytest.raises(PreferenceDataError, match=r"bad\.jsonl:3 \(record id 'PRP/1'\): field 'rejected\.text': missing"):
        recipe.load_pair_sets(cfg)


def test_too_few_pairs_for_a_held_out_set_is_an_error(setup, tmp_path):
    write_pairs(tmp_path / "one.jsonl", _pairs(1)[:1])
    recipe = _import_recipe()
    with pytest.raises(PreferenceDataError, match=r"one\.jsonl: 0 training and 1 held-out pairs"):
        recipe.load_pair_sets(recipe.PrmuConfig(pairs=[str(tmp_path / "one.jsonl")]))


def test_demo_held_out_pairs_never_have_their_mirror_image_in_training(tmp_path):
    # a query two users share (opposite golds) must be held out for both users or for neither
    from minitagpr.data import demo_world
    from minitagpr.data.preferences import split_heldout, synthesize_demo_pairs
    world = demo_world.build(tmp_path / "world", num_users=8, dev_users=2, per_user=3, shared_per_user=1,
                             history=8, vocab_size=600)
    recipe = _import_recipe()
    cfg = recipe.PrmuConfig(demo_world=str(world.root), heldout_frac=0.3)
    partner = {i: set(g) - {i} for g in world.user_dependent_groups for i in g}
    assert partner
    train, held = recipe.load_pair_sets(cfg)
    train_ids, held_ids = {p.example_id for p in train}, {p.example_id for p in held}
    assert any(p.user_dependent for p in held)
    assert {p.set for p in train} == {p.set for p in held} == {"PRP", "PQP", "style"}  # every set trains
    for i in held_ids:
        assert not partner.get(i, set()) & train_ids
    # the plain per-id split of the same pairs does separate some partners (what the link prevents)
    pairs = [p for s in synthesize_demo_pairs(world.root, seed=cfg.seed).values() for p in s]
    leaks = 0
    for seed in range(5):
        tr, he = split_heldout(pairs, 0.3, seed=seed)
        tr_ids = {p.example_id for p in tr}
        leaks += sum(bool(partner.get(p.example_id, set()) & tr_ids) for p in he)
    assert leaks > 0


def _import_recipe():
    spec = importlib.util.spec_from_file_location("train_prmu", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_prmu", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _run_in_process(recipe, args: list[str]) -> Path:
    """A one-process run inside pytest (a process group of one), so a test can patch the recipe's functions."""
    try:
        return recipe.run(recipe.parse_cli(recipe.PrmuConfig, args))
    finally:
        recipe.D.destroy_distributed()


def test_the_user_table_trains_at_table_lr_and_the_rest_at_lr(setup, monkeypatch):
    """The table's own learning rate (the paper's PRMU trains it far faster than the backbone) was unpinned: the
    recipe passing lr for it passed every test."""
    recipe = _import_recipe()
    made = []
    real = recipe.build_optimizer

    def recording(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]
    monkeypatch.setattr(recipe, "build_optimizer", recording)
    _run_in_process(recipe, _args(setup, "table_lr", max_steps=1, save_every=0, eval_every=0))
    groups = [(g.get("base_lr", g["lr"]), [tuple(p.shape) for p in g["params"]]) for g in made[0].param_groups]
    table = [(lr, shapes) for lr, shapes in groups if shapes and shapes[0][0] == 5]  # 4 users + the unknown row
    assert len(table) == 1 and table[0][0] == pytest.approx(1e-2) and len(table[0][1]) == 1
    assert all(lr == pytest.approx(1e-3) for lr, shapes in groups if (lr, shapes) not in table)


def test_resume_refuses_other_pairs_or_users_of_the_same_counts(setup, tmp_path):
    # the same number of pairs and users, but u0 and u1 swapped: every table row would now train another user
    # (a constant lr after warmup, min_lr_ratio=1, so that the run may be extended from 2 to 3 steps)
    _run_in_process(_import_recipe(), _args(setup, "fp", max_steps=2, save_every=1, min_lr_ratio=1.0))
    swapped = [dataclasses.replace(p, user={"u0": "u1", "u1": "u0"}.get(p.user, p.user)) for p in _pairs()]
    write_pairs(tmp_path / "swapped.jsonl", swapped)
    with pytest.raises(ConfigError, match="data fingerprint"):
        _run_in_process(_import_recipe(), _args(setup, "fp", max_steps=3, pairs=tmp_path / "swapped.jsonl",
                                                min_lr_ratio=1.0))
    _run_in_process(_import_recipe(), _args(setup, "fp", max_steps=3, min_lr_ratio=1.0))  # the same data resumes


@pytest.mark.parametrize("setting, message", [
    ("table_lr=-1", "table_lr must be a finite number >= 0"), ("lr=0", "lr must be a finite number > 0"),
    ("max_grad_norm=inf", "max_grad_norm must be a finite number >= 0"),
    ("min_lr_ratio=nan", r"min_lr_ratio must be a finite number in \[0, 1\]")])
def test_optimizer_settings_outside_their_range_are_refused_by_name(setup, setting, message):
    recipe = _import_recipe()
    with pytest.raises(ConfigError, match=message):
        recipe.parse_cli(recipe.PrmuConfig, _args(setup, "bad", **dict([setting.split("=")])))


def test_resume_refuses_an_init_whose_model_config_changed(setup, tmp_path):
    """init= is a path a resume may change; a same-shaped model with another rms_norm_eps loaded the checkpoint's
    weights and trained on with other maths (pinned 2026-11-29)."""
    import shutil
    moved = shutil.copytree(setup / "lm", tmp_path / "lm")
    _run_in_process(_import_recipe(), _args(setup, "arch", max_steps=2, save_every=1, min_lr_ratio=1.0))
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(ConfigError, match=r"init= now holds a model config other than the one this run trained "
                                          r"\(rms_norm_eps 1e-06 -> 1e-05\)"):
        _run_in_process(_import_recipe(), _args(setup, "arch", max_steps=3, init=moved, min_lr_ratio=1.0))
    _run_in_process(_import_recipe(), _args(setup, "arch", max_steps=3, min_lr_ratio=1.0))  # its own init goes on


def test_resume_refuses_another_learning_rate_or_schedule_length(setup):
    # the checkpoint's optimizer state would silently keep the old lr/table_lr, and a longer run moves the cosine
    _run_in_process(_import_recipe(), _args(setup, "lr", max_steps=2, save_every=1))
    records = {f: (setup / "lr" / f).read_bytes() for f in ("config.yaml", "pairs/train.jsonl", "pairs/heldout.jsonl")}
    with pytest.raises(ConfigError, match=r"table_lr 0\.01 -> 0\.2"):
        _run_in_process(_import_recipe(), _args(setup, "lr", max_steps=2, table_lr=0.2))
    # a refused resume leaves the run's audit record alone (it was rewritten before the checks)
    assert {f: (setup / "lr" / f).read_bytes() for f in records} == records
    with pytest.raises(ConfigError, match=r"max_steps 2 -> 3"):
        _run_in_process(_import_recipe(), _args(setup, "lr", max_steps=3))
    _run_in_process(_import_recipe(), _args(setup, "lr", max_steps=2, eval_every=1, save_every=2))  # plumbing


# ----------------------------------------------------------------------------------------------- user rows in a run
def test_user_dropout_reads_row_0_for_its_share_of_pairs_whatever_the_step():
    """user_keep_mask: ~user_dropout of the pairs lose their row (an inverted comparison drops ~1 - user_dropout),
    a function of (seed, step) only, and all kept without the table or without dropout."""
    recipe = _import_recipe()
    cfg = recipe.PrmuConfig(pairs=["x"], global_batch=4000, user_dropout=0.1, seed=3)
    masks = [recipe.user_keep_mask(step, cfg) for step in range(3)]
    for keep in masks:
        assert len(keep) == 4000 and 0.08 < keep.count(False) / 4000 < 0.12
    assert masks[0] != masks[1] and masks[0] == recipe.user_keep_mask(0, cfg)
    for off in (dataclasses.replace(cfg, user_dropout=0.0), dataclasses.replace(cfg, use_user_table=False)):
        assert recipe.user_keep_mask(5, off) == [True] * 4000


@pytest.fixture(scope="module")
def split_files(setup):
    """Training pairs of queries q0-q19 (users u0-u3); held-out pairs of q20-q23, two of them by a user ("u9") who
    has no training pair, so no table row."""
    pairs = _pairs()
    train = [p for p in pairs if int(p.example_id[1:]) < 20]
    held = [dataclasses.replace(p, user="u9") if int(p.example_id[1:]) % 2 else p
            for p in pairs if int(p.example_id[1:]) >= 20]
    write_pairs(setup / "split_train.jsonl", train)
    write_pairs(setup / "split_held.jsonl", held)
    return setup / "split_train.jsonl", setup / "split_held.jsonl"


def _table_run(setup, split_files, name, user_dropout):
    train, held = split_files
    _run_in_process(_import_recipe(), _args(setup, name, pairs=train, heldout_pairs=held, user_dropout=user_dropout,
                                            global_batch=8, micro_batch=4, max_steps=3, warmup_steps=0,
                                            eval_every=0, save_every=0))
    return setup / name


def _initial_model(setup):
    """The model a run on the four users u0-u3 starts from: the recipe's own load of `init` (seed 0)."""
    return load_reward_model(setup / "lm", dtype=torch.float32, users=["u0", "u1", "u2", "u3"], new_head=True)


def _initial_table_row(setup) -> torch.Tensor:
    """The row every user (and the unknown row 0) starts from."""
    return _initial_model(setup).user_table.weight[0].detach()


def test_the_unknown_row_trains_only_through_user_dropout(setup, split_files):
    """Row 0 gets a gradient only from the pairs that user dropout sends to it (no training pair has an unknown
    user): without dropout it keeps its initial value exactly (Adam moves nothing on a zero gradient, the table is
    never weight-decayed); with dropout it moves. A loop that ignores the keep mask left row 0 untrained."""
    start = _initial_table_row(setup)
    without = load_reward_model(_table_run(setup, split_files, "no_dropout", 0.0) / "hf").user_table.weight.detach()
    with_dropout = load_reward_model(_table_run(setup, split_files, "dropout", 0.5) / "hf").user_table.weight.detach()
    assert torch.equal(without[0], start)
    assert (without[1:] - start).abs().max() > 1e-3  # the users' rows trained (table_lr 1e-2, 3 steps)
    assert (with_dropout[0] - start).abs().max() > 1e-3


def test_held_out_users_get_no_row_and_evaluation_scores_each_pair_with_its_users_row(setup, split_files):
    """The user vocabulary is the training pairs' users (a held-out-only user reads row 0, as at RL time), and the
    held-out loss the run reports is that of each pair scored with its own user's row: recomputed from the export,
    where scoring every pair with row 0 would give another number."""
    out = setup / "no_dropout"
    if not (out / "final_eval.json").exists():
        _table_run(setup, split_files, "no_dropout", 0.0)
    held = read_pairs(split_files[1])
    assert {p.user for p in held} == {"u0", "u2", "u9"}
    scorer = PRMUScorer.from_pretrained(out / "hf")
    assert scorer.model.users.users == ["u0", "u1", "u2", "u3"]  # u9 has no row of its own

    def mean_loss(users):
        f_pos = torch.tensor(scorer.logits(users, [p.prompt for p in held], [p.chosen.text for p in held]))
        f_neg = torch.tensor(scorer.logits(users, [p.prompt for p in held], [p.rejected.text for p in held]))
        return (-torch.nn.functional.logsigmoid(f_pos - f_neg)).mean().item()

    final = json.loads((out / "final_eval.json").read_text())
    assert final["all_pairs"] == len(held) == 8
    assert final["all_loss"] == pytest.approx(mean_loss([p.user for p in held]), rel=1e-5)
    assert abs(mean_loss([None] * len(held)) - final["all_loss"]) > 1e-4  # the rows make a difference, 100x the tol


def test_micro_batches_of_2_and_of_the_whole_batch_give_the_same_losses(setup, one_proc_run):
    """The Bradley-Terry loss is divided by the global pair count in every micro-batch: normalising each micro-batch
    by its own size multiplied the loss (and gradient) by the number of micro-batches, the same on any world size
    (so the 1-vs-2-process test cannot see it)."""
    _run_in_process(_import_recipe(), _args(setup, "mb8", micro_batch=8))
    small, whole = _losses(one_proc_run), _losses(setup / "mb8")
    assert sorted(small) == sorted(whole) == [1, 2, 3, 4]
    for step in small:
        assert whole[step] == pytest.approx(small[step], rel=1e-4), step  # summation order only
    # (weights are not compared: Adam turns the summation-order noise of near-zero gradients into +-lr steps)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-12])
def test_the_step_clips_the_gradient_norm_to_max_grad_norm(setup, max_grad_norm):
    """Clipped to 1e-12, every gradient entry sits far below Adam's eps (1e-8): the first step moves no weight (nor
    table row) by more than about 1e-4 x its lr. Unclipped, Adam's first step moves weights by about lr."""
    out = f"clip{max_grad_norm}"
    _run_in_process(_import_recipe(), _args(setup, out, max_grad_norm=max_grad_norm, max_steps=1, warmup_steps=0,
                                            user_dropout=0.0, eval_every=0, save_every=0))
    before = _initial_model(setup).state_dict()
    after = load_reward_model(setup / out / "hf").state_dict()
    moved = {n: (after[n] - before[n]).abs().max().item() for n in after}
    table = moved.pop("user_table.weight")
    if max_grad_norm:
        assert max(moved.values()) < 2e-4 * 1e-3 and table < 2e-4 * 1e-2, (max(moved.values()), table)
    else:
        assert max(moved.values()) > 0.5 * 1e-3 and table > 0.5 * 1e-2, (max(moved.values()), table)


def test_fractional_epochs_give_the_step_count_as_written_and_a_long_warmup_is_noted(setup, monkeypatch, capsys):
    """epochs=1.1 of 50 steps per epoch is 55 steps, though 1.1 * 50 is 55.00000000000001 in floats."""
    recipe = _import_recipe()

    class Planned(Exception):
        pass

    def progress(total_steps, *args, **kwargs):
        raise Planned(total_steps)
    monkeypatch.setattr(recipe, "steps_per_epoch", lambda *args: 50)
    monkeypatch.setattr(recipe, "Progress", progress)
    with pytest.raises(Planned) as planned:
        _run_in_process(recipe, _args(setup, "fractional", epochs=1.1, warmup_steps=60, save_every=0))
    assert planned.value.args[0] == 55
    assert ("[prmu] note: warmup_steps=60 is not below the run's 55 steps: the learning rate rises to 92% of lr at "
            "the last step and never decays") in capsys.readouterr().out
