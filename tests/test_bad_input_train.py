"""Bad input to the training recipes and their readers ends in one line that names the file, record and field (or
the config key) -- before any work is done where it can be, never a traceback from deep inside, never a silent skip.
Each case here was a traceback, a silent acceptance or a late failure before (black-box sweep, 2026-11-26)."""
import dataclasses
import json

import pytest

from lamp_fixtures import make_examples
from recipe_modules import load_recipe
from minitagpr import cli
from minitagpr.config import ConfigError, parse_cli
from minitagpr.data import lamp
from minitagpr.data.preferences import PreferenceDataError, write_pairs
from minitagpr.model.checkpoint import CheckpointError
from minitagpr.rl.loop import RLConfig, load_prompts
from minitagpr.train.sft_data import DataError as SftDataError
from minitagpr.train.sft_data import read_sft_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# ----------------------------------------------------------------------------------------------- how recipes end
@pytest.mark.parametrize("err", [PermissionError(13, "Permission denied", "/ro/out"),
                                 NotADirectoryError(20, "Not a directory", "/a/file/sub"),
                                 OSError(30, "Read-only file system", "/rofs/out"),
                                 OSError(28, "No space left on device"),  # a write() names no path
                                 OSError(122, "Disk quota exceeded")])
def test_an_os_error_that_names_a_path_or_a_full_disk_ends_in_one_line(err, capsys):
    with pytest.raises(SystemExit) as stop, cli.exit_on_user_error("sft"):
        raise err
    assert stop.value.code == 1 and capsys.readouterr().err.startswith(f"[sft] error: {err}")


def test_an_os_error_without_a_path_is_a_bug_and_keeps_its_traceback():
    with pytest.raises(OSError), cli.exit_on_user_error("sft"):
        raise OSError("something internal")


def test_a_recipe_tears_the_process_group_down_whatever_happens(monkeypatch, capsys):
    """run_recipe: a user error (one line, exit 1), a bug (its traceback) and a normal end all tear the group down."""
    calls = []
    monkeypatch.setattr(cli.D, "destroy_distributed", lambda: calls.append("destroyed"))

    def user_error():
        raise ConfigError("config key 'lr' (from command line): expected a float, got 'fast'")

    with pytest.raises(SystemExit) as stop:
        cli.run_recipe("sft", user_error)
    assert stop.value.code == 1 and capsys.readouterr().err.startswith("[sft] error: config key 'lr'")
    with pytest.raises(KeyError):
        cli.run_recipe("sft", lambda: {}["missing"])
    cli.run_recipe("sft", lambda: None)
    assert calls == ["destroyed"] * 3


# ----------------------------------------------------------------------------------------------- resume
def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path, capfd):
    from minitagpr import distributed as D
    from minitagpr.model.presets import make_tiny_checkpoint
    from minitagpr.train.optim import build_optimizer

    ckpt = make_tiny_checkpoint(tmp_path / "m", seed=0)
    info = D.init_distributed()
    try:
        model = D.build_sharded_causal_lm(ckpt, info, D.device_mesh(info))
        opt = build_optimizer(model, 1e-3)
        folder = D.save_checkpoint(tmp_path / "ck", 3, model, opt, {"data": "x"})
        state = (folder / "state.json").read_text()
        for damage, why in (("{", "state.json is not valid JSON"), ('{"step": "three"}', "integer 'step' >= 0")):
            (folder / "state.json").write_text(damage)
            with pytest.raises(CheckpointError, match=f"step_000003: cannot resume from this checkpoint \\(.*{why}"
                                                      f".*resume=false"):
                D.load_checkpoint(folder, model, opt)
        (folder / "state.json").write_text(state)
        metadata = (folder / ".metadata").read_bytes()
        (folder / ".metadata").write_bytes(metadata[:200])  # DCP logged two tracebacks before it raised
        capfd.readouterr()
        with pytest.raises(CheckpointError, match="cannot resume from this checkpoint .*pickle data was truncated"):
            D.load_checkpoint(folder, model, opt)
        assert "Traceback" not in capfd.readouterr().err
        (folder / ".metadata").write_bytes(metadata)
        shard = next(folder.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])  # a truncated shard: DCP's exception is a BaseException
        with pytest.raises(CheckpointError, match="cannot resume from this checkpoint"):
            D.load_checkpoint(folder, model, opt)
        # with an older complete checkpoint beside it, the advice keeps that one (resume=false would delete both)
        D.save_checkpoint(tmp_path / "ck", 2, model, opt, {"data": "x"}, keep_last=0)
        with pytest.raises(CheckpointError, match=r"step_000003: cannot resume from this checkpoint \(.*\); delete "
                                                  r"it to resume from step_000002, the newest complete checkpoint "
                                                  r"before it \(resume=false would delete every checkpoint"):
            D.load_checkpoint(folder, model, opt)
    finally:
        D.destroy_distributed()


# ----------------------------------------------------------------------------------------------- SFT records
def _sft_line(i, **over):
    rec = {"id": f"r{i}", "user": "u", "task": "LaMP-2", "messages": [{"role": "user", "content": "q"}],
           "chain": "<make_decision>x</make_decision>", "answer": "comedy"}
    return json.dumps({**rec, **over}) + "\n"


@pytest.mark.parametrize("lines,match", [
    ([_sft_line(0).encode(), b'{"id": "r1", "task": "caf\xe9"}\n'], r"sft\.jsonl:2: not valid UTF-8"),
    ([_sft_line(0).encode(), _sft_line(0).encode()], r"sft\.jsonl:2: record id 'r0' repeats the id of line 1"),
    ([_sft_line(0, task="LaMP-9").encode()], r"sft\.jsonl:1 \(record id 'r0'\): field 'task': unknown task"),
    ([_sft_line(0, messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]).encode()],
     r"field 'messages' must end with a user turn, got 'assistant'"),
])
def test_sft_records_refuse_bad_bytes_repeated_ids_unknown_tasks_and_a_last_assistant_turn(tmp_path, lines, match):
    (tmp_path / "sft.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(SftDataError, match=match):
        read_sft_records(tmp_path / "sft.jsonl")


# ----------------------------------------------------------------------------------------------- PRMU
def _prmu_setup(tmp_path):
    from test_prmu_recipe import _pairs
    write_pairs(tmp_path / "pairs.jsonl", _pairs())
    return ["init=unused", f"pairs={tmp_path / 'pairs.jsonl'}", f"out_dir={tmp_path / 'out'}"]


@pytest.mark.parametrize("bad,match", [("micro_batch=0", "micro_batch must be >= 1"),
                                       ("eval_batch=0", "eval_batch must be >= 1"),
                                       ("log_every=0", "log_every must be >= 1"),
                                       ("mixed_precision=fp16", "mixed_precision must be one of"),
                                       ("init_preset=huge", "init_preset must be one of"),
                                       ("epochs=0", r"epochs must be a finite number > 0"),  # trained one step
                                       ("max_steps=-3", "max_steps must be >= 0"),  # read as 0
                                       ("seed=-1", r"seed must be a finite number in \[0, 2147483648\)"),
                                       ("seed=35184372088832", "seed must be"),  # 2**45: torch seed overflow
                                       ("keep_last=-1", "keep_last must be >= 0"),  # these three were read as 0
                                       ("save_every=-1", "save_every must be >= 0"),
                                       ("eval_every=-1", "eval_every must be >= 0")])
def test_prmu_config_values_are_checked_before_any_work(tmp_path, bad, match):
    prmu = load_recipe("train_prmu")
    with pytest.raises(ConfigError, match=f"{match}.*\\(settings from command line\\)"):
        parse_cli(prmu.PrmuConfig, [*_prmu_setup(tmp_path), bad])


@pytest.mark.parametrize("bad,match", [("max_steps=-3", "max_steps must be >= 0"),
                                       ("seed=-1", r"seed must be a finite number in \[0, 2147483648\)"),
                                       ("seed=35184372088832", "seed must be"),  # a traceback at step 0
                                       ("keep_last=-1", "keep_last must be >= 0"),  # read as 0 (keep all)
                                       ("save_every=-5", "save_every must be >= 0"),  # read as 0
                                       ("eval_max_new_tokens=0", "eval_max_new_tokens must be >= 1"),  # after export
                                       ("seq_len=1", "seq_len must be >= 2"),  # a traceback from the packer
                                       ("eval_holdout=-3", "eval_holdout must be >= 0"),  # read as 0
                                       ("demo_preset=huge", "demo_preset must be one of")])  # a KeyError, late
def test_sft_step_count_and_seed_are_checked_when_parsed(bad, match):
    sft = load_recipe("sft")
    with pytest.raises(ConfigError, match=match):
        parse_cli(sft.SftConfig, [bad])


def test_prmu_pairs_given_twice_or_held_out_pairs_seen_in_training_are_refused(tmp_path):
    prmu = load_recipe("train_prmu")
    base = _prmu_setup(tmp_path)
    pairs = str(tmp_path / "pairs.jsonl")
    twice = parse_cli(prmu.PrmuConfig, [*base, f"pairs={pairs},{pairs}"])
    with pytest.raises(PreferenceDataError, match="pair id 'PRP/0' appears in more than one file"):
        prmu.load_pair_sets(twice)
    leak = parse_cli(prmu.PrmuConfig, [*base, f"heldout_pairs={pairs}"])
    with pytest.raises(PreferenceDataError, match="held-out pair\\(s\\) share an id or a query"):
        prmu.load_pair_sets(leak)


def test_a_prompt_message_the_chat_renderer_refuses_is_named_at_its_line(tmp_path):
    from minitagpr.data.preferences import read_pairs
    from test_prmu_recipe import _pairs
    bad = dataclasses.replace(_pairs()[0], prompt=[{"role": "user", "content": "q", "extra": 1}])
    write_pairs(tmp_path / "p.jsonl", [bad])
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl:1 .*field 'prompt': .*unknown field\(s\) 'extra'"):
        read_pairs(tmp_path / "p.jsonl")


def test_prmu_refuses_a_tokenizer_larger_than_the_model(tmp_path, qwen3_tokenizer_dir):
    # the 151k-id Qwen3 tokenizer on a 512-row model: an IndexError deep inside the embedding before
    from minitagpr.model.presets import make_tiny_checkpoint
    prmu = load_recipe("train_prmu")
    ckpt = make_tiny_checkpoint(tmp_path / "small", seed=0)
    args = [*_prmu_setup(tmp_path), f"init={ckpt}", "new_head=true", f"tokenizer={qwen3_tokenizer_dir}",
            "global_batch=2", "micro_batch=2", "max_steps=1"]
    with pytest.raises(ConfigError, match=f"tokenizer {qwen3_tokenizer_dir} has 151[0-9]+ ids but the model .*small "
                                          f"only 512 embedding rows"):
        try:
            prmu.run(parse_cli(prmu.PrmuConfig, args))
        finally:
            prmu.D.destroy_distributed()


# ----------------------------------------------------------------------------------------------- RL config, data
@pytest.mark.parametrize("bad,match", [
    ("tasks=LaMP-9:2", "tasks: unknown task 'LaMP-9'"),
    ("tasks=LaMP-1:-1", "tasks: cannot parse the count of 'LaMP-1:-1'"),
    ("prompts_per_step=0", "prompts_per_step must be >= 1"),
    ("micro_batch_size=0", "micro_batch_size must be >= 1"),
    ("retriever=foo", "retriever must be one of"),
    ("prompt_style=weird", "prompt_style must be one of"),
    ("rouge_variant=rouge9", "rouge_variant must be one of"),
])
def test_rl_config_values_are_checked_before_any_work(bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_cli(RLConfig, ["policy=p", "data_root=d", "prompts_per_step=4", "num_minibatches=1", bad])


def test_engine_vllm_without_vllm_fails_when_the_run_starts_not_when_the_config_loads(monkeypatch):
    # the paper's configs say engine: vllm and must still load (and be checked) on CPU machines
    from minitagpr import rollout
    from minitagpr.rl import loop
    monkeypatch.setattr(rollout, "vllm_available", lambda: False)
    cfg = parse_cli(RLConfig, ["policy=p", "data_root=d", "prompts_per_step=4", "num_minibatches=1", "engine=vllm"])
    with pytest.raises(rollout.RolloutError, match="engine=vllm needs the vllm package"):
        loop.train(cfg)


@pytest.mark.parametrize("temperature", ["2.5", "0.005"])
def test_a_temperature_vllm_cannot_sample_at_fails_when_the_run_starts(monkeypatch, temperature):
    # not at the first generate, after the policy was sharded and vLLM had loaded its own copy
    from minitagpr import rollout
    from minitagpr.rl import loop
    monkeypatch.setattr(rollout, "vllm_available", lambda: True)
    monkeypatch.setattr(loop.D, "init_distributed", lambda *a, **kw: pytest.fail("the run started"))
    args = ["policy=p", "data_root=d", "prompts_per_step=4", "num_minibatches=1", f"temperature={temperature}"]
    with pytest.raises(rollout.RolloutError, match=rf"temperature {temperature}: the vLLM engine samples at 0 "):
        loop.train(parse_cli(RLConfig, args + ["engine=vllm"]))
    assert parse_cli(RLConfig, args + ["engine=builtin"]).temperature == float(temperature)  # the built-in one can


def test_a_bad_peak_tflops_variable_is_named_before_any_model_loads(monkeypatch, tmp_path):
    from minitagpr.rl import loop
    monkeypatch.setenv("MINITAGPR_PEAK_TFLOPS", "abc")
    monkeypatch.setattr(loop.D, "build_sharded_causal_lm", lambda *a, **kw: pytest.fail("a model was loaded"))
    sft = load_recipe("sft")
    runs = [lambda: loop.train(parse_cli(RLConfig, ["policy=p", "data_root=d", "prompts_per_step=4",
                                                     "num_minibatches=1"])),
            lambda: sft.run(parse_cli(sft.SftConfig, ["model=m", "data=d.jsonl", f"out_dir={tmp_path}"]))]
    for run in runs:  # RL's policy and SFT's model and data do not exist: the variable is read first
        try:
            with pytest.raises(ConfigError, match=r"MINITAGPR_PEAK_TFLOPS='abc': expected a number of TFLOP/s > 0"):
                run()
        finally:
            loop.D.destroy_distributed()


def _lamp_root(tmp_path, task="LaMP-3", part="train", extra_gold=False):
    examples, golds = make_examples(task, n=3, n_items=4, seed=1)
    if extra_gold:
        golds = {**golds, "999": "3"}
    q, o = lamp.split_files(tmp_path / "lamp", task, "user", part)
    lamp.write_questions(q, examples)
    lamp.write_outputs(o, task, golds)
    return tmp_path / "lamp", q, o


def test_rl_prompts_refuse_gold_ids_without_a_question_and_an_unset_data_root(tmp_path):
    root, _, o = _lamp_root(tmp_path, extra_gold=True)
    cfg = parse_cli(RLConfig, ["policy=p", f"data_root={root}", "tasks=LaMP-3:0", "prompts_per_step=4",
                               "num_minibatches=1"])
    with pytest.raises(lamp.DataError, match=f"{o}: gold output\\(s\\) for id\\(s\\) with no question .*'999'"):
        load_prompts(cfg, tokenizer=None)
    with pytest.raises(ConfigError, match="data_root= is required"):
        load_prompts(dataclasses.replace(cfg, data_root=""), tokenizer=None)


# ----------------------------------------------------------------------------------------------- PRMU rollouts
def test_rollout_command_checks_its_output_path_and_golds_before_sampling(tmp_path):
    rollouts = load_recipe("prmu_rollouts")
    root, q, o = _lamp_root(tmp_path)
    args = ["policy=unused", f"questions={q}", f"outputs={o}"]
    with pytest.raises(ConfigError, match="limit must be >= 0"):
        parse_cli(rollouts.RolloutConfig, [*args, "out=x.jsonl", "limit=-1"])
    with pytest.raises(ConfigError, match="batch_prompts must be >= 1"):
        parse_cli(rollouts.RolloutConfig, [*args, "out=x.jsonl", "batch_prompts=0"])
    (tmp_path / "taken").mkdir()
    try:  # a folder where the file goes: found before the model loads, not after every sample is drawn
        with pytest.raises(ConfigError, match=f"out={tmp_path / 'taken'} is a folder"):
            rollouts.run(parse_cli(rollouts.RolloutConfig, [*args, f"out={tmp_path / 'taken'}"]))
        _, _, o2 = _lamp_root(tmp_path / "x", extra_gold=True)
        with pytest.raises(lamp.DataError, match="gold output\\(s\\) for id\\(s\\) with no question"):
            rollouts.run(parse_cli(rollouts.RolloutConfig, ["policy=unused", f"questions={q}", f"outputs={o2}",
                                                            f"out={tmp_path / 'r.jsonl'}"]))
    finally:
        rollouts.D.destroy_distributed()


# ----------------------------------------------------------------------------------------------- config files
def test_a_yaml_key_given_twice_is_an_error_not_the_last_value(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 1\nmax_steps: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml is not valid YAML: key 'max_steps' appears twice "
                                          r"\(first on line 1\) \(line 2"):
        parse_cli(RLConfig, ["--config", str(tmp_path / "c.yaml")])


def test_a_misplaced_nested_key_suggests_the_key_it_meant(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lr' .*did you mean 'lr'\\?"):
        parse_cli(RLConfig, ["--config", str(tmp_path / "c.yaml")])


def test_a_full_disk_during_a_checkpoint_save_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """DCP wraps a rank's ENOSPC in its CheckpointException, a BaseException the recipes' one-line handler let
    through as a traceback; the save raises the OSError itself, and the killed save leaves only its .tmp folder."""
    import errno
    import os

    from minitagpr import distributed as D
    from minitagpr.model.presets import make_tiny_checkpoint
    from minitagpr.train.optim import build_optimizer

    ckpt = make_tiny_checkpoint(tmp_path / "m", seed=0)
    info = D.init_distributed()
    try:
        model = D.build_sharded_causal_lm(ckpt, info, D.device_mesh(info))
        opt = build_optimizer(model, 1e-3)

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(SystemExit) as stop, cli.exit_on_user_error("sft"):
            D.save_checkpoint(tmp_path / "ck", 1, model, opt, {})
        assert stop.value.code == 1 and "[sft] error: [Errno 28] No space left on device" in capsys.readouterr().err
        assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step_000001.tmp"]
    finally:
        D.destroy_distributed()
