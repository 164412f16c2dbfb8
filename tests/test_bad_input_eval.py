"""Bad input to evaluate, the metrics CLI and the chat server ends in one line that names the file, record and field
(or the config key) -- before any work is done where it can be, never a traceback from deep inside, never a number
computed from a broken gold. Each case here was a traceback, a silent acceptance or a late failure before (black-box
sweep, findings B1-B3, B10, B11, W2, W3)."""
import runpy
import shutil
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from lamp_fixtures import make_examples
from recipe_modules import load_recipe
from minitagpr import metrics, serve
from minitagpr.config import ConfigError, parse_cli
from minitagpr.data import lamp
from minitagpr.model import presets

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


ev = load_recipe("evaluate", "recipe_evaluate")


@pytest.fixture(scope="module")
def lamp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lamp")
    examples, golds = make_examples("LaMP-3", n=3, n_items=4, seed=1)
    questions, outputs = lamp.split_files(root, "LaMP-3", "user", "dev")
    lamp.write_questions(questions, examples)
    lamp.write_outputs(outputs, "LaMP-3", golds)
    return root


def _run_evaluate_cli(monkeypatch, args):
    """recipes/evaluate.py's __main__ in this process -> (exit code, the SystemExit)."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "recipes" / "evaluate.py"), run_name="__main__")
    return stop.value.code


# ----------------------------------------------------------------------------------------------- evaluate
def test_evaluate_ends_a_checkpoint_error_in_one_line(lamp_root, tmp_path, monkeypatch, capsys):  # B1
    not_a_folder = tmp_path / "model.safetensors"
    not_a_folder.write_bytes(b"")
    code = _run_evaluate_cli(monkeypatch, [f"data={lamp_root}", "tasks=LaMP-3", f"checkpoints=t={not_a_folder}",
                                           "engine=builtin", f"out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"[evaluate] error: checkpoints=t: {not_a_folder}: expected a checkpoint "
                                        f"folder")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("setting, key", [
    ("limit=-1", "limit"),  # was a silent subset: the first n-1 questions
    ("batch_prompts=0", "batch_prompts"),
    ("max_new_tokens=0", "max_new_tokens"),
    ("temperature=-1", "temperature"),
    ("top_p=0", "top_p"),
    ("retriever=foo", "retriever"),
    ("sweep_retrievers=recency,foo", "sweep_retrievers"),
    ("prompt_style=weird", "prompt_style"),
    ("split=users", "split"),
    ("part=devv", "part"),  # became a folder name: "no such file" after the model had loaded
])
def test_evaluate_settings_are_checked_when_parsed_naming_the_key(setting, key):  # B11
    with pytest.raises(ConfigError, match=rf"invalid EvalConfig config: {key} must be"):
        parse_cli(ev.EvalConfig, ["checkpoints=t=ckpt", "tasks=LaMP-3", setting])


def test_evaluate_engine_vllm_without_vllm_fails_before_any_work(monkeypatch, tmp_path):  # B11
    import minitagpr.rollout as R

    monkeypatch.setattr(R, "vllm_available", lambda: False)
    monkeypatch.setattr(ev, "load_task_data", lambda *a, **kw: pytest.fail("data loaded before the engine check"))
    with pytest.raises(R.RolloutError, match="engine=vllm needs the vllm package"):
        ev.run(parse_cli(ev.EvalConfig, ["checkpoints=t=ckpt", "tasks=LaMP-3", "engine=vllm",
                                         f"out_dir={tmp_path}"]))


@pytest.mark.parametrize("engine", ["vllm", "auto"])
def test_evaluate_at_a_temperature_vllm_cannot_sample_at_fails_before_any_work(monkeypatch, tmp_path, engine):
    import minitagpr.rollout as R

    monkeypatch.setattr(R, "vllm_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # engine=auto picks vllm where both are here
    monkeypatch.setattr(ev, "load_task_data", lambda *a, **kw: pytest.fail("data loaded before the engine check"))
    with pytest.raises(R.RolloutError, match=r"temperature 2.5: the vLLM engine samples at 0 \(greedy\) or in "):
        ev.run(parse_cli(ev.EvalConfig, ["checkpoints=t=ckpt", "tasks=LaMP-3", f"engine={engine}",
                                         "temperature=2.5", f"out_dir={tmp_path}"]))


def test_an_unwritable_out_dir_is_found_before_any_generation(lamp_root, tmp_path, monkeypatch):  # W2
    a_file = tmp_path / "a_file"
    a_file.write_text("")

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started although out_dir cannot be written")

    monkeypatch.setattr(ev, "make_engine", no_generation)
    cfg = parse_cli(ev.EvalConfig, [f"data={lamp_root}", "tasks=LaMP-3", "checkpoints=t=ckpt", "engine=builtin",
                                    f"out_dir={a_file / 'sub'}"])
    with pytest.raises(ConfigError, match=rf"out_dir={a_file / 'sub'}: cannot write there \({a_file} is a file, "
                                          rf"not a folder\)"):
        ev.run(cfg)


def test_prediction_ids_that_do_not_match_name_both_files(lamp_root, tmp_path):  # W3
    td = ev.load_task_data(lamp_root, "LaMP-3")
    gold_file = lamp.split_files(lamp_root, "LaMP-3", "user", "dev")[1]
    first, *rest = td.golds
    short = lamp.write_outputs(tmp_path / "short.json", "LaMP-3", {i: "3" for i in rest})
    with pytest.raises(lamp.DataError) as err:
        ev.evaluate_prediction_files({"x": [short]}, [td])
    assert str(err.value) == (f"{short}: prediction ids must match gold ids one to one; 1 gold id(s) missing from "
                              f"the predictions: '{first}' (golds: {gold_file})")


def test_a_limit_that_cuts_the_golds_is_named_with_the_prediction_file(lamp_root, tmp_path):  # W3
    all_ids = ev.load_task_data(lamp_root, "LaMP-3").golds
    full = lamp.write_outputs(tmp_path / "full.json", "LaMP-3", {i: "3" for i in all_ids})
    td = ev.load_task_data(lamp_root, "LaMP-3", limit=2)
    with pytest.raises(lamp.DataError) as err:
        ev.evaluate_prediction_files({"x": [full]}, [td])
    message = str(err.value)
    assert message.startswith(f"{full}: prediction ids must match gold ids one to one; 1 prediction id(s) not among "
                              f"the golds: '{list(all_ids)[2]}'")
    assert message.endswith("; limit=2 keeps only the first 2 question(s))")


# ----------------------------------------------------------------------------------------------- metrics CLI
@pytest.mark.parametrize("task, gold", [("LaMP-3", "nan"), ("LaMP-3", "inf"), ("LaMP-3", "7"), ("LaMP-3", "abc"),
                                        ("LaMP-1", "[3]")])
def test_metrics_cli_refuses_a_gold_that_is_no_answer_of_its_task(task, gold, tmp_path, capsys):  # B10
    ok = "3" if task == "LaMP-3" else "[1]"
    preds = lamp.write_outputs(tmp_path / "p.json", task, {"1": ok, "2": ok})
    golds = lamp.write_outputs(tmp_path / "g.json", task, {"1": gold, "2": ok})
    assert metrics.main([str(preds), str(golds)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no table of numbers
    assert captured.err.startswith(f"error: {golds}: record 0 (id '1'): field 'golds.output': ")


# ----------------------------------------------------------------------------------------------- serve
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    return presets.make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", preset="tiny",
                                        tokenizer_dir=tiny_tokenizer_dir)


def test_serve_ends_a_checkpoint_error_in_one_line(checkpoint, tmp_path):  # B2
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, no_weights / name)
    with pytest.raises(SystemExit) as stop:
        serve.main([str(no_weights), "--port", "0"])
    assert stop.value.code == f"minitagpr.serve: cannot start: {no_weights}: no model.safetensors or " \
                              f"model.safetensors.index.json"  # sys.exit(message): exit status 1
    with pytest.raises(SystemExit) as stop:  # W6: a missing folder is a missing checkpoint, not a tokenizer folder
        serve.main([str(tmp_path / "nope"), "--port", "0"])
    assert "no such checkpoint folder" in stop.value.code and "tokenizer" not in stop.value.code


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_refuses_a_port_outside_0_to_65535(port, tmp_path, capsys):  # B2
    """The command line refuses the port when parsed, before it looks at the checkpoint (here none)."""
    with pytest.raises(SystemExit) as stop:
        serve.main([str(tmp_path / "no_checkpoint"), "--port", port])
    assert stop.value.code == 2
    assert f"argument --port: must be an integer from 0 to 65535 (0: pick a free one), got '{port}'" \
           in capsys.readouterr().err


def test_serve_checks_the_request_log_at_startup(checkpoint, tmp_path):  # B3
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=rf"--request-log {a_file / 'log.jsonl'}: cannot append to it "
                                          rf"\(Not a directory\)"):
        serve.make_server(checkpoint, port=0, request_log=a_file / "log.jsonl")


def test_a_request_log_that_fails_later_still_answers_the_client(checkpoint, tmp_path, capfd):  # B3
    log = tmp_path / "logs" / "requests.jsonl"
    log.parent.mkdir()
    server = serve.make_server(checkpoint, port=0, request_log=log)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        shutil.rmtree(log.parent)
        log.parent.write_text("")  # the log's folder is now a file: every append fails
        with urllib.request.urlopen(server.base_url + "/models", timeout=60) as reply:
            assert reply.status == 200 and b"tiny" in reply.read()
    finally:
        server.shutdown()
        server.server_close()
    assert f"minitagpr.serve: cannot append to the request log {log}: Not a directory" in capfd.readouterr().err


def test_pgraphrag_reader_names_an_unreadable_date_and_an_empty_file(tmp_path):  # W4
    import json

    from minitagpr.data import pgraphrag
    review = {"title": "t", "text": "x", "pid": "p", "rating": 4, "date": "garbage"}
    (tmp_path / "a.json").write_text(json.dumps([{"id": "u1", "profile": [review, {**review, "date": None}]}]))
    with pytest.raises(lamp.DataError, match=r"a\.json: record 0 \(id 'u1'\): field 'profile\[0\]\.date': cannot read "
                                             r"date 'garbage'"):
        pgraphrag.load_users(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("[]")
    with pytest.raises(lamp.DataError, match=r"b\.json: no users"):
        pgraphrag.load_users(tmp_path / "b.json")


def test_evaluate_refuses_a_task_listed_twice_before_any_decoding():
    """Both passes used to be decoded in full before the table refused the second one, writing nothing."""
    with pytest.raises(ConfigError, match="tasks: LaMP-3 listed more than once"):
        parse_cli(ev.EvalConfig, ["checkpoints=t=ckpt", "tasks=LaMP-3,lamp_3"])


@pytest.mark.parametrize("yaml_name", ["eval_lamp.yaml", "eval_robustness.yaml"])
def test_paper_eval_configs_need_data_instead_of_scoring_the_demo_world(yaml_name):
    """Without data= these configs used to fall back to data=demo and write a demo table under the LaMP out_dir."""
    config = str(REPO / "recipes" / "configs" / yaml_name)
    with pytest.raises(ConfigError, match="data= is required for LaMP tasks"):
        parse_cli(ev.EvalConfig, ["--config", config, "checkpoints=base=Qwen/Qwen3-8B"])
    cfg = parse_cli(ev.EvalConfig, ["--config", config, "checkpoints=t=c", "data=/data/LaMP", "dense_encoder=enc"])
    assert cfg.data == "/data/LaMP"


def test_eval_demo_config_repeats_the_main_jobs_table_settings():
    guided_rl = load_recipe("guided_rl")
    config = str(REPO / "recipes" / "configs" / "eval_demo.yaml")
    cfg = parse_cli(ev.EvalConfig, ["--config", config, "checkpoints=t=c"])
    main = guided_rl.GuidedConfig()
    assert (cfg.data, cfg.part, cfg.retriever, cfg.k, cfg.max_prompt_tokens, cfg.max_new_tokens, cfg.temperature) == \
        ("demo", "dev", main.retriever, main.k, main.max_prompt_tokens, main.max_new_tokens, 0.0)
    assert Path(cfg.data_dir) == Path(main.workdir) / "world" and Path(cfg.out_dir) != Path(main.workdir) / "eval"


def test_evaluate_refuses_the_time_split_on_the_demo_world():
    """The demo world has the user split only: split=time silently scored the user split."""
    with pytest.raises(ConfigError, match=r"split='time': the demo world has the user split only"):
        parse_cli(ev.EvalConfig, ["checkpoints=t=ckpt", "data=demo", "split=time"])


@pytest.mark.parametrize("setting, key", [("retriever=dense", "retriever"), ("split=users", "split"),
                                          ("part=devv", "part")])
def test_rl_and_prmu_rollouts_check_retriever_split_and_part_when_parsed(setting, key):
    """retriever=dense passed the check and failed after the model loaded: neither recipe loads an encoder."""
    from minitagpr.rl.loop import RLConfig
    from recipe_modules import load_recipe
    with pytest.raises(ConfigError, match=rf"{key} must be one of"):
        parse_cli(RLConfig, ["policy=p", "data_root=d", setting])
    if key == "retriever":
        rollouts = load_recipe("prmu_rollouts")
        with pytest.raises(ConfigError, match=r"retriever must be one of 'recency', 'bm25', 'bm25okapi', 'random', "
                                              r"got 'dense'"):
            parse_cli(rollouts.RolloutConfig, ["policy=p", "questions=q", "outputs=o", "out=x", setting])


def test_a_folder_in_the_way_of_a_cell_file_is_found_before_decoding(lamp_root, checkpoint, tmp_path, monkeypatch):
    """A folder where a cell's stamp goes, and a file where a later row's generations folder goes, are both named
    before the first cell decodes (they were OS errors after decoding that cell)."""
    def no_generation(*args, **kwargs):
        raise AssertionError("generation started although a cell's files cannot be written")

    monkeypatch.setattr(ev, "generate_answers", no_generation)
    out = tmp_path / "out"
    (out / "generations" / "t").mkdir(parents=True)
    (out / "generations" / "t" / "LaMP-3.stamp.json").mkdir()
    (out / "generations" / "u").write_text("")
    cfg = parse_cli(ev.EvalConfig, [f"data={lamp_root}", "tasks=LaMP-3", "engine=builtin", f"out_dir={out}",
                                    f"checkpoints=t={checkpoint},u={checkpoint}"])
    with pytest.raises(ConfigError) as err:
        ev.run(cfg)
    msg = str(err.value)
    assert f"out_dir={out / 'generations' / 't' / 'LaMP-3.stamp.json'} is a folder; give a file path" in msg
    assert (f"out_dir={out / 'generations' / 'u' / 'LaMP-3.jsonl'}: cannot write there "
            f"({out / 'generations' / 'u'} is a file, not a folder)") in msg
    assert msg.count(" | ") == 2 and not (out / "table.json").exists()  # u's two generations files, t's stamp
