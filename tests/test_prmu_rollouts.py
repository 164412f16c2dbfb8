"""recipes/prmu_rollouts.py: which queries it samples, what each rollout record says about the length limits, and
its settings against guided RL's.

The sampling tests run the recipe in-process with a recording stand-in for vLLM (the engine's own tests cover
generation); one test runs the command itself on a tiny model with the built-in engine.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import minitagpr.rollout as rollout_pkg
from minitagpr.config import ConfigError, parse_cli
from minitagpr.data import demo_world, lamp, prompts
from minitagpr.data.preferences import format_response, main as preferences_main, read_rollouts
from minitagpr.data.retrieval import get_retriever
from minitagpr.model.presets import make_tiny_checkpoint
from minitagpr.rl.loop import RLConfig, load_prompts
from minitagpr.rollout.base import Completion
from minitagpr.tokenizer import Tokenizer
from recipe_modules import load_recipe

REPO = Path(__file__).resolve().parents[1]
recipe = load_recipe("prmu_rollouts")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prmu_rollouts")
    w = demo_world.build(root / "world", num_users=6, dev_users=2, per_user=2, shared_per_user=1, history=8,
                         vocab_size=600)
    policy = make_tiny_checkpoint(root / "policy", tokenizer_dir=w.tokenizer_dir)
    return w, policy


def _args(world, out, *extra):
    w, policy = world
    return [f"policy={policy}", f"questions={w.questions['LaMP-2']['train']}",
            f"outputs={w.outputs['LaMP-2']['train']}", f"out={out}", *extra]


def _examples(world):
    return lamp.load_questions(world[0].questions["LaMP-2"]["train"], "LaMP-2")


class RecordingVLLM:
    """Stands in for VLLMEngine: records how it was built; sample 0 of every prompt runs into the length limit.
    Texts differ between prompts (they name the prompt's length), so a profile and a bare response make a candidate
    PRP pair."""

    built: dict = {}
    seeds: list = []  # the seed argument of every generate() call

    def __init__(self, checkpoint_dir, tokenizer=None, **kwargs):
        RecordingVLLM.built = kwargs

    def generate(self, prompt_token_ids, n=1, max_new_tokens=256, seed=None, **_):
        RecordingVLLM.seeds.append(seed)
        def sample(ids, j):
            if j == 0:
                return Completion([1] * max_new_tokens, f"<think>{len(ids)} and then", [0.0] * max_new_tokens,
                                  "length")
            return Completion([1, 2], format_response(f"<analyze_input>{len(ids)}</analyze_input>", "comedy"),
                              [0.0, 0.0], "stop")
        return [[sample(ids, j) for j in range(n)] for ids in prompt_token_ids]


def _run_with_recording_vllm(monkeypatch, args):
    monkeypatch.setattr(rollout_pkg, "VLLMEngine", RecordingVLLM)
    monkeypatch.setattr(recipe, "require_vllm", lambda temperature=None: None)  # the stand-in needs no vllm
    try:
        return recipe.run(parse_cli(recipe.RolloutConfig, [*args, "engine=vllm"]))
    finally:
        recipe.D.destroy_distributed()


# ----------------------------------------------------------------------------------------------- length limits
def test_each_record_says_which_responses_the_length_limit_cut(world, tmp_path, monkeypatch, capsys):
    out = _run_with_recording_vllm(monkeypatch, _args(world, tmp_path / "r.jsonl", "n=3", "limit=2"))
    records = read_rollouts(out)
    assert len(records) == 4
    for r in records:  # the engine's finish_reason "length" is what the RL loop zeroes R_f for
        assert r.truncated == [True, False, False]
    assert "cut by max_new_tokens=2048: 4 of 12 responses" in capsys.readouterr().out


def test_each_requests_seed_is_its_place_in_the_run_whatever_the_batch(world, tmp_path, monkeypatch):
    """Seeds were seed * 1,000,003 + rank * 100,003 + batch start: another batch_prompts or process count sampled
    other responses for the same query (and two runs' seeds could meet)."""
    seeds = {}
    for bp in (1, 3):
        RecordingVLLM.seeds = []
        out = _run_with_recording_vllm(monkeypatch, _args(world, tmp_path / f"r{bp}.jsonl", "n=2", "limit=3",
                                                          "seed=5", f"batch_prompts={bp}"))
        assert all(isinstance(s, list) for s in RecordingVLLM.seeds)  # per-prompt seeds, not one per call
        seeds[bp] = [s for call in RecordingVLLM.seeds for s in call]
        assert [(r.id, r.mode) for r in read_rollouts(out)] == [
            (ex.id, m) for ex in recipe.draw_questions(_examples(world), "LaMP-2", parse_cli(
                recipe.RolloutConfig, _args(world, out, "limit=3", "seed=5"))) for m in ("profile", "no_profile")]
    assert seeds[1] == seeds[3] == [recipe.sample_base(5, i) for i in range(6)]


def test_rank_shares_merge_in_query_order():
    """Query g is sampled by rank g % world size; the file lists the queries in order whatever the process count."""
    recs = {g: [f"q{g}-profile", f"q{g}-bare"] for g in range(5)}
    shares = [recs[0] + recs[2] + recs[4], recs[1] + recs[3]]  # two ranks' records, in each one's request order
    assert recipe.merge_shares(shares, 5) == [x for g in range(5) for x in recs[g]]
    assert recipe.merge_shares([recs[0] + recs[1]], 2) == recs[0] + recs[1]  # one process: its own order
    assert recipe.merge_shares([recs[0], recs[1], []], 2) == recs[0] + recs[1]  # a rank with no query


def test_an_existing_output_is_refused_unless_overwrite(world, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    out.write_text("hours of sampling\n")
    with pytest.raises(ConfigError, match=rf"out={out} exists .*overwrite=true"):
        _run_with_recording_vllm(monkeypatch, _args(world, out, "n=1", "limit=1"))
    assert out.read_text() == "hours of sampling\n"
    _run_with_recording_vllm(monkeypatch, _args(world, out, "n=1", "limit=1", "overwrite=true"))
    assert len(read_rollouts(out)) == 2


def test_the_vllm_engine_gets_the_configured_memory_share_and_never_sleeps(world, tmp_path, monkeypatch):
    _run_with_recording_vllm(monkeypatch, _args(world, tmp_path / "r.jsonl", "n=1", "limit=1",
                                                "vllm_gpu_memory_utilization=0.5"))
    assert RecordingVLLM.built["gpu_memory_utilization"] == 0.5
    assert RecordingVLLM.built["sleep_level"] == 0  # the weights never change: sleeping would reload them per batch
    assert RecordingVLLM.built["max_model_len"] == 4096 + 2048


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_a_vllm_memory_share_outside_0_1_is_refused(world, tmp_path, value):
    with pytest.raises(ConfigError, match=r"vllm_gpu_memory_utilization must be in \(0, 1\]"):
        parse_cli(recipe.RolloutConfig, _args(world, tmp_path / "r.jsonl", f"vllm_gpu_memory_utilization={value}"))


@pytest.mark.parametrize("setting, message", [("temperature=0", "temperature must be a finite number >= 0.0001"),
                                              ("temperature=nan", "temperature must be a finite number"),
                                              ("top_p=0", r"top_p must be a finite number in \(0, 1\]")])
def test_sampling_settings_outside_their_range_are_refused_before_the_policy_loads(world, tmp_path, setting,
                                                                                   message):
    """temperature 0 with n = 4 gave four identical greedy samples per mode (no quality pair, repeated PRP pairs);
    it was refused only at the first generate(), after the policy or vLLM had loaded."""
    with pytest.raises(ConfigError, match=message):
        parse_cli(recipe.RolloutConfig, _args(world, tmp_path / "r.jsonl", setting))


def test_the_progress_header_changes_with_the_policys_files_and_the_engine(world, tmp_path):
    """policy= names a folder: a re-export into it is another policy, and a resume must not merge its samples with
    the old one's; nor samples of another engine."""
    import shutil
    from types import SimpleNamespace
    from minitagpr.model.checkpoint import files_digest
    from minitagpr.model.presets import make_tiny_checkpoint
    policy = shutil.copytree(world[1], tmp_path / "policy")
    cfg = parse_cli(recipe.RolloutConfig, _args(world, tmp_path / "r.jsonl"))
    info = SimpleNamespace(rank=0, world_size=1)
    before = recipe._progress_header(cfg, info, [], files_digest(policy), "builtin")
    assert recipe._progress_header(cfg, info, [], files_digest(policy), "builtin") == before
    assert recipe._progress_header(cfg, info, [], files_digest(policy), "vllm") != before
    make_tiny_checkpoint(tmp_path / "other", seed=9, tokenizer_dir=policy)  # same shapes, other weights
    shutil.copyfile(tmp_path / "other" / "model.safetensors", policy / "model.safetensors")
    assert recipe._progress_header(cfg, info, [], files_digest(policy), "builtin") != before


def test_k_0_is_refused_since_its_profile_prompt_would_hold_no_profile(world, tmp_path):
    with pytest.raises(ConfigError, match=r"k must be >= 1"):
        parse_cli(recipe.RolloutConfig, _args(world, tmp_path / "r.jsonl", "k=0"))


def test_each_record_says_how_many_profile_items_the_prompt_budget_dropped(world, tmp_path, monkeypatch, capsys):
    tok = Tokenizer.from_dir(world[0].tokenizer_dir)
    examples = _examples(world)
    bare = max(len(tok.apply_chat(prompts.build_messages(ex, []), add_generation_prompt=True)) for ex in examples)
    # a budget that every bare prompt fits but no prompt with all k = 4 items does
    out = _run_with_recording_vllm(monkeypatch, _args(world, tmp_path / "r.jsonl", "n=1", "k=4", "sample=first",
                                                      f"max_prompt_tokens={bare}"))
    by = {(r.id, r.mode): r for r in read_rollouts(out)}
    for ex in examples:
        items = get_retriever("recency").select(ex, 4)
        kept = prompts.fit_messages(ex, items, tok, bare)[1]
        assert by[ex.id, "profile"].profile_items_dropped == len(items) - kept > 0
        assert by[ex.id, "no_profile"].profile_items_dropped == 0
    assert (f"profile prompts that dropped retrieved items to fit max_prompt_tokens={bare}: {len(examples)} of "
            f"{len(examples)}") in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- which queries
def test_sample_rl_draws_the_questions_guided_rl_trains_on(world, tmp_path):
    """In LaMP's user split a user is a question id: PRMU's table trains a row only for users with pairs."""
    w, _ = world
    tok = Tokenizer.from_dir(w.tokenizer_dir)
    for seed in (0, 3):
        rl = load_prompts(RLConfig(data_root=str(w.root), tasks="LaMP-2:5", seed=seed, k=2), tok)
        cfg = parse_cli(recipe.RolloutConfig, _args(world, tmp_path / "r.jsonl", "rl_tasks=LaMP-1:7,LaMP-2:5",
                                                    f"seed={seed}"))
        assert [ex.id for ex in recipe.draw_questions(_examples(world), "LaMP-2", cfg)] == [p.id for p in rl]
    assert [p.id for p in rl] != [ex.id for ex in _examples(world)[:5]]  # not the file's first five


def test_a_limit_keeps_the_first_of_rls_draw_and_sample_first_keeps_the_files_order(world, tmp_path):
    examples = _examples(world)
    draw = lambda *a: [ex.id for ex in recipe.draw_questions(  # noqa: E731
        examples, "LaMP-2", parse_cli(recipe.RolloutConfig, _args(world, tmp_path / "r.jsonl", *a)))]
    assert draw("rl_tasks=LaMP-2:5", "seed=3", "limit=2") == draw("rl_tasks=LaMP-2:5", "seed=3")[:2]
    assert draw("sample=first", "limit=3") == [ex.id for ex in examples[:3]]
    assert draw("rl_tasks=LaMP-2:0") == [ex.id for ex in examples]  # RL's count 0: the whole file, in order


def test_an_rl_task_mix_without_this_task_is_refused(world, tmp_path):
    cfg = parse_cli(recipe.RolloutConfig, _args(world, tmp_path / "r.jsonl", "rl_tasks=LaMP-1:10"))
    with pytest.raises(ConfigError, match=r"rl_tasks: LaMP-2 is not in the RL task mix 'LaMP-1:10'"):
        recipe.draw_questions(_examples(world), "LaMP-2", cfg)
    with pytest.raises(ConfigError, match=r"rl_tasks: cannot parse"):
        parse_cli(recipe.RolloutConfig, _args(world, tmp_path / "r.jsonl", "rl_tasks=LaMP-2:many"))


# ----------------------------------------------------------------------------------------------- settings
def test_the_defaults_are_guided_rls_paper_settings():
    """PRMU scores RL's prompts and responses: its pairs should come from prompts and lengths like those."""
    paper = yaml.safe_load((REPO / "recipes" / "configs" / "guided_rl_qwen3_8b.yaml").read_text())
    cfg = recipe.RolloutConfig(policy="p", questions="q", outputs="o", out="r.jsonl")
    for key in ("max_prompt_tokens", "max_new_tokens", "k", "retriever", "tasks"):
        mine = cfg.rl_tasks if key == "tasks" else getattr(cfg, key)
        assert mine == paper[key], key
    assert cfg.sample == "rl" and cfg.engine == "auto"


# ----------------------------------------------------------------------------------------------- the command
def test_rollout_command_samples_each_query_with_and_without_the_profile(world, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    cmd = [sys.executable, str(REPO / "recipes" / "prmu_rollouts.py"),
           *_args(world, out, "n=2", "limit=2", "k=2", "max_new_tokens=8", "rl_tasks=LaMP-2:5", "seed=3")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_rollouts(out)
    assert sorted((r.id, r.mode) for r in records) == sorted(
        (i, m) for i in {r.id for r in records} for m in ("profile", "no_profile"))
    assert len(records) == 4 and all(len(r.responses) == 2 and r.task == "LaMP-2" for r in records)
    rl_draw = recipe.draw_questions(_examples(world), "LaMP-2", parse_cli(
        recipe.RolloutConfig, _args(world, out, "rl_tasks=LaMP-2:5", "seed=3")))
    assert {r.id for r in records} == {ex.id for ex in rl_draw[:2]}
    assert "queries: 2 of the 5 questions RL draws for LaMP-2 (rl_tasks='LaMP-2:5', seed=3)" in proc.stdout
    by = {(r.id, r.mode): r for r in records}
    for rid in {r.id for r in records}:  # the bare prompt is the profile prompt without its history items
        assert len(by[rid, "no_profile"].prompt[-1]["content"]) < len(by[rid, "profile"].prompt[-1]["content"])
    # 8 new tokens cut most responses of the untrained model (one may sample a stop id such as <|endoftext|>);
    # the records and the log count the same ones
    cut = [t for r in records for t in r.truncated]
    assert len(cut) == 8 and sum(cut) >= 4
    assert f"cut by max_new_tokens=8: {sum(cut)} of 8 responses" in proc.stdout


def test_a_killed_sampling_run_resumes_its_finished_batches_and_ends_as_an_uninterrupted_one(world, tmp_path):
    """Hours of sampling were held in memory to the end: a kill lost them all. Each finished batch is now on disk,
    and a rerun samples only the rest, with the same seeds (pinned 2026-11-29)."""
    from minitagpr.distributed import FAULT_ENV

    def sample(out, *extra, fault=None, check=True):
        cmd = [sys.executable, str(REPO / "recipes" / "prmu_rollouts.py"),
               *_args(world, out, "n=2", "limit=3", "k=2", "max_new_tokens=6", "batch_prompts=2", "engine=builtin",
                      *extra)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({FAULT_ENV: fault} if fault else {})}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
        assert not check or proc.returncode == 0, proc.stderr[-2000:]
        return proc

    sample(tmp_path / "whole.jsonl")
    cut = tmp_path / "cut.jsonl"
    assert sample(cut, fault="batch:4", check=False).returncode != 0  # killed before its third batch (of 3)
    progress = cut.with_name("cut.jsonl.rank00000.progress")
    assert len(progress.read_text().splitlines()) == 3 and not cut.exists()  # header + 2 finished batches
    header, first, second = progress.read_text().splitlines(keepends=True)
    # the first batch's line removed (as a damaged line's error advises): that batch is sampled again, in the middle
    # of the run, and comes out as it did
    progress.write_text(header + second + '{"start": 4, "recor')  # and a write the kill cut short
    refused = sample(cut, "seed=1", check=False)  # other settings: the progress is not theirs
    assert refused.returncode != 0 and f"{progress}: sampling progress of an earlier run" in refused.stderr
    resumed = sample(cut)
    assert "resumes 1 finished batch(es) (2 requests)" in resumed.stdout
    assert [vars(r) | {"origin": None} for r in read_rollouts(cut)] == \
        [vars(r) | {"origin": None} for r in read_rollouts(tmp_path / "whole.jsonl")]
    assert not progress.exists()


def test_two_processes_write_the_file_one_process_writes(world, tmp_path):
    """Shares meet on rank 0 through a collective and merge in query order; each request is seeded by its place in
    the run: the process count and batch_prompts change nothing (here not even a float: fp32 on one machine)."""
    def sample(out, procs, batch):
        launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        f"--nproc_per_node={procs}"]
        cmd = [*launcher, str(REPO / "recipes" / "prmu_rollouts.py"),
               *_args(world, out, "n=2", "limit=5", "k=2", "max_new_tokens=6", "engine=builtin",
                      f"batch_prompts={batch}")]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [vars(r) | {"origin": None} for r in read_rollouts(out)]

    one = sample(tmp_path / "one.jsonl", 1, 4)
    assert len(one) == 10 and one == sample(tmp_path / "two.jsonl", 2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]  # no part or progress files


def test_pairs_from_rollouts_that_the_length_limit_cut_are_refused_by_name(world, tmp_path, monkeypatch, capsys):
    out = _run_with_recording_vllm(monkeypatch, _args(world, tmp_path / "r.jsonl", "n=1", "limit=2"))
    capsys.readouterr()
    assert preferences_main(["from-rollouts", str(out), "--out-dir", str(tmp_path / "pairs")]) == 1
    captured = capsys.readouterr()
    assert "responses cut by the length limit: 4 of 4" in captured.out
    assert "no PRP pairs could be built" in captured.err
    assert "2 candidate pairs were left out because a response was cut by the length limit" in captured.err


def test_a_policy_trained_with_another_prompt_style_is_refused(world, tmp_path, monkeypatch):
    import shutil

    from minitagpr.data.prompts import TRAINING_FILE
    w, policy = world
    brief = shutil.copytree(policy, tmp_path / "brief_policy")
    (brief / TRAINING_FILE).write_text('{"prompt_style": "brief"}')
    args = [a if not a.startswith("policy=") else f"policy={brief}" for a in _args(world, tmp_path / "r.jsonl")]
    with pytest.raises(ConfigError, match=r"trained with prompt_style=brief .* pass prompt_style=brief"):
        _run_with_recording_vllm(monkeypatch, args)
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("questions, outputs, part", [("dev_questions.json", "dev_outputs.json", "dev"),
                                                     ("TEST_questions.json", "x_outputs.json", "TEST"),
                                                     ("train_questions.json", "dev_outputs.json", "dev")])
def test_dev_or_test_question_files_are_refused_unless_allowed(tmp_path, questions, outputs, part):
    """PRMU pairs from the dev part would train the reward model on the questions the evaluation scores; the path
    was taken as given."""
    args = ["policy=p", f"questions={tmp_path / questions}", f"outputs={tmp_path / outputs}", "out=r.jsonl"]
    with pytest.raises(ConfigError, match=rf"is a {part} file: PRMU pairs from it would train the reward model on "
                                          r"the questions the evaluation scores"):
        parse_cli(recipe.RolloutConfig, args)
    assert parse_cli(recipe.RolloutConfig, [*args, "allow_eval_questions=true"]).allow_eval_questions


def test_train_question_files_pass_the_held_out_check(world, tmp_path):
    parse_cli(recipe.RolloutConfig, _args(world, tmp_path / "r.jsonl"))


def _progress_file(tmp_path, *lines: bytes):
    from minitagpr.data.preferences import RolloutRecord
    header = {"format": recipe.PROGRESS_FORMAT, "run": "x"}
    rec = RolloutRecord(id="q1", user="u1", task="LaMP-2", mode="profile", prompt=[{"role": "user", "content": "q"}],
                        gold="comedy", responses=["ça été « comédie »"], truncated=[False],
                        profile_items_dropped=0)
    good = recipe._progress_line(0, [rec]).encode("utf-8")
    path = tmp_path / "r.jsonl.rank00000.progress"
    path.write_bytes((json.dumps(header) + "\n").encode() + good + b"".join(lines))
    return path, header, good


def test_a_kill_that_cut_a_character_in_two_loses_only_that_batch(tmp_path):
    """Progress lines hold the policy's text as UTF-8; a tail cut inside a character was a UnicodeDecodeError."""
    line = _progress_file(tmp_path)[2]
    torn = line[:line.index("ç".encode()) + 1]  # the first byte of a two-byte character
    path, header, _ = _progress_file(tmp_path, torn)
    done = recipe._read_progress(path, header)
    assert list(done) == [0] and done[0][0].responses == ["ça été « comédie »"]
    assert path.read_bytes() == (json.dumps(header) + "\n").encode() + line  # rewritten without the torn tail


_FIVE = (b'{"start": 4, "records": [{"id": "q2", "user": "u1", "task": "LaMP-2", "mode": "profile", "prompt": '
         b'[{"role": "user", "content": "q"}], "gold": "comedy", "responses": 5}]}\n')


@pytest.mark.parametrize("bad,match", [(_FIVE, r"r\.jsonl\.rank00000\.progress:3 \(record id 'q2'\): field "
                                               r"'responses': expected list, got int"),
                                       (b'{"start": 4, "records": 7}\n', r"progress:3: not a progress line"),
                                       (b'{"start": 4, "records": [7]}\n', r"progress:3: a rollout record must be "
                                                                            r"a JSON object, got int"),
                                       (b'\xff\n', r"progress:3: not a progress line \(UnicodeDecodeError\)")])
def test_a_damaged_progress_line_before_the_last_is_named_before_anything_is_written(tmp_path, bad, match):
    """A record with "responses": 5 was accepted, written to `out`, then crashed the run (and `out` was kept)."""
    path, header, line = _progress_file(tmp_path, bad, b'{"start": 8, "records": []}\n')
    with pytest.raises(ConfigError, match=match + r".*remove line 3 of .*progress to sample only that batch again.*"
                                                  r"or delete the file to start over"):
        recipe._read_progress(path, header)
    # the advice holds: without that line the file resumes, the good batches kept and the removed one left to sample
    kept = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(kept[:2] + kept[3:]))
    assert sorted(recipe._read_progress(path, header)) == [0, 8]
