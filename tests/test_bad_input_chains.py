"""Bad input to build_chains ends in one line that names the file, line or record, and field -- never a traceback
from deep inside, never a silent pass into sft.jsonl. Each case here was a traceback or a silent acceptance before
(black-box sweep, findings B4, B7 and B15)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from minitagpr.data import demo_world
from minitagpr.data.chains import ChainDataError, run_stages
from minitagpr.data.lamp import DataError, split_files
from minitagpr.data.prompts import render_item
from test_chains import cfg_out, chain_record, instance, judged, make_cfg, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _run(cfg, stage):
    run_stages(cfg, [stage], transports={}, log=lambda m: None)


def _build_chains():
    """recipes/build_chains.py as a module."""
    if hasattr(sys.modules.get("build_chains"), "policy_embed_fn"):
        return sys.modules["build_chains"]
    spec = importlib.util.spec_from_file_location("build_chains", REPO / "recipes" / "build_chains.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_chains"] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- stage files (B15)
@pytest.mark.parametrize("judge, error", [
    ({"scores": {}}, "field 'judge.total': missing"),
    ({"scores": {}, "total": "high"}, "field 'judge.total': expected int, got str"),
    ({"scores": [], "total": 18}, "field 'judge.scores': expected dict, got list"),
])
def test_a_judge_field_without_a_whole_total_names_file_line_and_field(tmp_path, judge, error):
    cfg = make_cfg(tmp_path, **{"filters.max_per_instance": 1})
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [judged(inst, 0), {**judged(inst, 1), "judge": judge}])
    with pytest.raises(ChainDataError, match=rf"formatted\.jsonl: line 2 \(id 'LaMP-3/7/1'\): {error}"):
        _run(cfg, "sft")


def test_a_profile_item_that_is_not_an_object_names_the_instances_file_line_and_field(tmp_path):
    cfg = make_cfg(tmp_path)
    inst = {**instance(), "profile": ["just a string"]}
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [judged(inst, 0)])
    with pytest.raises(ChainDataError, match=r"instances\.jsonl: line 1 \(id 'LaMP-3/7'\): field 'profile\[0\]': "
                                             r"expected an object, got str"):
        _run(cfg, "sft")


def test_render_item_refuses_an_item_that_is_not_an_object():
    with pytest.raises(DataError, match=r"profile item \(LaMP-3\): expected an object, got str"):
        render_item("LaMP-3", "fine kettle")


def test_an_instance_user_that_is_not_a_string_is_refused_before_it_reaches_sft_jsonl(tmp_path):
    cfg = make_cfg(tmp_path)
    inst = {**instance(), "user": ["u1"]}
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [judged(inst, 0)])
    with pytest.raises(ChainDataError, match=r"instances\.jsonl: line 1 \(id 'LaMP-3/7'\): field 'user': expected "
                                             r"str or null, got list"):
        _run(cfg, "sft")
    assert not (cfg_out(cfg) / "sft.jsonl").exists()


@pytest.mark.parametrize("stage, source", [("accuracy", "teacher.jsonl"), ("sft", "formatted.jsonl")])
def test_a_chain_id_on_two_lines_is_an_error_naming_both(tmp_path, stage, source):
    cfg = make_cfg(tmp_path)
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    record = judged(inst, 0) if stage == "sft" else chain_record(inst, 0)
    write_jsonl(cfg_out(cfg) / source, [record, {**record, "sample": 1}])
    with pytest.raises(ChainDataError, match=rf"{source.replace('.', '[.]')}: line 2 \(id 'LaMP-3/7/0'\): field 'id': "
                                             r"duplicate record id \(first on line 1\)"):
        _run(cfg, stage)
    assert not (cfg_out(cfg) / "accurate.jsonl").exists() and not (cfg_out(cfg) / "sft.jsonl").exists()


def test_a_record_whose_task_is_not_its_instances_is_refused(tmp_path):
    cfg = make_cfg(tmp_path)
    inst = instance("LaMP-1", "9", gold="[2]")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "teacher.jsonl", [{**chain_record(inst, 0, answer="[2]"), "task": "LaMP-3"}])
    with pytest.raises(ChainDataError, match=r"teacher\.jsonl: record id 'LaMP-1/9/0': field 'task': 'LaMP-3', but "
                                             r"instance 'LaMP-1/9' in instances\.jsonl is 'LaMP-1'"):
        _run(cfg, "accuracy")


def test_explored_tags_that_are_not_strings_name_the_line_and_position(tmp_path):
    cfg = make_cfg(tmp_path)
    write_jsonl(cfg_out(cfg) / "explored.jsonl", [{"id": "a", "task": "LaMP-3", "tags": ["decide", None]}])
    with pytest.raises(ChainDataError, match=r"explored\.jsonl: line 1 \(id 'a'\): field 'tags\[1\]': expected str, "
                                             r"got NoneType"):
        _run(cfg, "cluster")


@pytest.mark.parametrize("text, error", [
    ('{"stage": "sample", "tasks": {"LaMP-3": {"in"', r"stats/sample\.json: not valid JSON"),
    ('{"stage": "sample"}', r"stats/sample\.json: field 'tasks': expected an object"),
    ('{"tasks": {"LaMP-3": {"in": 2, "out": "1", "dropped": {}}}}',
     r"stats/sample\.json: field 'tasks\.LaMP-3\.out': expected a whole number"),
    ('{"tasks": {}, "extra": {"histogram": {"LaMP-3": {"high": 1}}}}',
     r"stats/sample\.json: field 'extra\.histogram\.LaMP-3': expected an object of"),
    ('{"tasks": {}, "extra": {"max_per_instance": "2"}}',
     r"stats/sample\.json: field 'extra\.max_per_instance': expected a whole number"),
    ('{"tasks": {}, "extra": {"seq_len_fit": {"seq_len": 4096.5, "tasks": {}}}}',
     r"stats/sample\.json: field 'extra\.seq_len_fit': expected an object with a whole-number seq_len"),
    ('{"tasks": {}, "extra": {"seq_len_fit": {"seq_len": 8, "tasks": {"LaMP-3": {"records": 2, "fit": 1}}}}}',
     r"stats/sample\.json: field 'extra\.seq_len_fit\.tasks\.LaMP-3': expected an object of whole numbers"),
])
def test_a_damaged_stats_file_is_named_with_its_field(tmp_path, text, error):
    cfg = make_cfg(tmp_path)
    (cfg_out(cfg) / "stats").mkdir(parents=True)
    (cfg_out(cfg) / "stats" / "sample.json").write_text(text)
    with pytest.raises(DataError, match=error):
        _run(cfg, "report")


# ----------------------------------------------------------------------------------------------- the recipe (B4, B7)
@pytest.mark.parametrize("where, said", [("file", "is a file, not a folder"),
                                         ("file/sub", "cannot be created or written")])
def test_an_out_dir_that_cannot_be_a_folder_ends_in_one_line(tmp_path, capsys, where, said):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / where
    assert _build_chains().main(["stages=report", f"out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"build_chains: error: out_dir {out} {said}") and err.count("\n") == 1


def test_a_truncated_policy_checkpoint_ends_in_one_line_naming_the_file(tmp_path, capsys):
    from minitagpr.model.presets import make_tiny_checkpoint
    from train_fixtures import write_tokenizer

    ckpt = make_tiny_checkpoint(tmp_path / "policy", tokenizer_dir=write_tokenizer(tmp_path / "tok"))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = ["stages=cluster", "tagging.embedder=policy", f"tagging.policy_checkpoint={ckpt}",
            f"out_dir={tmp_path / 'out'}"]
    assert _build_chains().main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"build_chains: error: tagging.policy_checkpoint: {weights}: truncated safetensors file")
    assert err.count("\n") == 1


def test_a_bad_sft_tokenizer_folder_ends_in_one_line(tmp_path, capsys):
    """A ConfigError raised by a stage (not at parse) ended in a traceback: only a fixed list of types was caught."""
    argv = ["stages=sft", f"sft_tokenizer={tmp_path / 'nonexistent'}", f"out_dir={tmp_path / 'out'}"]
    assert _build_chains().main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("build_chains: error: ") and "nonexistent" in err and err.count("\n") == 1


def test_the_sample_stage_refuses_golds_for_ids_no_question_has(tmp_path):
    # an outputs file out of step with its questions (e.g. copied from another split) was sampled from silently
    world = demo_world.build(tmp_path / "world", num_users=4, dev_users=2, per_user=2, shared_per_user=1)
    outputs = split_files(world.root, "LaMP-3", "user", "train")[1]
    data = json.loads(outputs.read_text())
    data["golds"].append({"id": "not-a-question", "output": "4"})
    outputs.write_text(json.dumps(data))
    cfg = make_cfg(tmp_path, **{"data.lamp_root": str(world.root), "data.tasks": "LaMP-3", "data.per_task": 2})
    with pytest.raises(DataError, match=rf"{outputs}: gold output\(s\) for id\(s\) with no question in .*"
                                        rf"train_questions\.json: 'not-a-question'"):
        _run(cfg, "sample")
    assert not (cfg_out(cfg) / "instances.jsonl").exists()


@pytest.mark.parametrize("setting, key", [("data.part=devv", "data.part"), ("data.split=users", "data.split"),
                                          ("data.retriever=dense", "data.retriever")])
def test_the_chain_configs_data_keys_are_checked_when_parsed(setting, key):
    """data.part and data.split were not checked: a typo surfaced as a missing file after the endpoints were set."""
    from minitagpr.config import ConfigError, parse_cli
    from minitagpr.data.chains import ChainsConfig
    with pytest.raises(ConfigError, match=rf"{key} must be one of"):
        parse_cli(ChainsConfig, ["data.lamp_root=x", setting])


def test_a_missing_sft_tokenizer_is_named_before_the_sft_stage_writes(tmp_path):
    from minitagpr.config import ConfigError
    cfg = make_cfg(tmp_path, sft_tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(ConfigError, match=r"sft_tokenizer=.*no-tokenizer: tokenizer folder .* does not exist"):
        _run(cfg, "sft")
    assert not (cfg_out(cfg) / "sft.jsonl").exists()
