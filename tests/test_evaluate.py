"""recipes/evaluate.py: checkpoints and prediction files side by side on LaMP-format fixtures, official-format
outputs, robustness sweeps, and the command line."""
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from lamp_fixtures import make_examples
from recipe_modules import load_recipe
from minitagpr.config import ConfigError, parse_cli
from minitagpr.data import lamp
from minitagpr.metrics import evaluate
from minitagpr.model import presets

REPO = Path(__file__).resolve().parents[1]
TASKS = ["LaMP-2", "LaMP-3", "LaMP-5"]  # one label, one rating and one generation task


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny matmuls, one thread


ev = load_recipe("evaluate", "recipe_evaluate")
_REAL_MAKE_ENGINE = ev.make_engine


@pytest.fixture(scope="module")
def lamp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lamp")
    for task in TASKS:
        examples, golds = make_examples(task, n=3, n_items=6, seed=1)
        questions, outputs = lamp.split_files(root, task, "user", "dev")
        lamp.write_questions(questions, examples)
        lamp.write_outputs(outputs, task, golds)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer_dir):
    base = tmp_path_factory.mktemp("ckpt")
    return {name: presets.make_tiny_checkpoint(base / name, seed=seed, tokenizer_dir=tiny_tokenizer_dir,
                                               tie_word_embeddings=False, initializer_range=0.3)
            for name, seed in (("base", 0), ("sft", 1))}


@pytest.fixture(scope="module")
def two_rows(lamp_root, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    table = ev.evaluate_checkpoints(checkpoints, TASKS, data=lamp_root, max_new_tokens=4, out_dir=out,
                                    engine="builtin", log=lambda *_: None)
    return table, out


def test_checkpoints_become_rows_with_every_task_metric(two_rows):
    table, _ = two_rows
    assert list(table.rows) == ["base", "sft"]
    for results in table.rows.values():
        assert set(results["LaMP-2"]) == {"accuracy", "f1_macro"}
        assert set(results["LaMP-3"]) == {"mae", "rmse"}
        assert set(results["LaMP-5"]) == {"rouge1", "rougeL"}
    assert table.examples == {"LaMP-2": 3, "LaMP-3": 3, "LaMP-5": 3}


def test_markdown_table_has_the_paper_columns_and_one_line_per_checkpoint(two_rows):
    table, _ = two_rows
    md = table.markdown("dev")
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header == "| method | L2 acc | L2 F1 | L3 MAE | L3 RMSE | L5 R-1 | L5 R-L | cut |"  # cut: decoded rows
    assert sum(line.startswith("| base |") or line.startswith("| sft |") for line in md.splitlines()) == 2


def test_written_predictions_are_official_format_and_rescore_to_the_table(two_rows, lamp_root):
    from minitagpr.data import answers

    table, out = two_rows
    for task in TASKS:
        path = out / "predictions" / "sft" / f"{lamp.task_spec(task).file_name}_predictions.json"
        file_task, preds = lamp.load_outputs(path)
        assert lamp.canonical_task(file_task) == task
        _, golds = lamp.load_outputs(lamp.split_files(lamp_root, task, "user", "dev")[1])
        assert evaluate(task, preds, golds) == pytest.approx(table.rows["sft"][task])
        # a random model scores at the floor whatever it writes, so check the file's answers themselves too
        records = [json.loads(x) for x in (out / "generations" / "sft" / f"{task}.jsonl").read_text().splitlines()]
        assert preds == {r["id"]: answers.extract_answer(r["text"]) for r in records}


def _fake_generation(monkeypatch, answer_for_k):
    """evaluate.py without a model: every answer is answer_for_k(k) after a think block."""
    monkeypatch.setattr(ev, "make_engine", lambda *a, **kw: (None, None))

    def generate(engine, tokenizer, data, *, k, **kw):
        return [{"id": ex.id, "text": f"<think>c</think>{answer_for_k(k)}", "finish_reason": "stop",
                 "profile_items": k, "prompt_tokens": 1, "completion_tokens": 1} for ex in data.examples]
    monkeypatch.setattr(ev, "generate_answers", generate)


def test_a_one_setting_sweep_keeps_its_own_rows_and_files(lamp_root, tmp_path, monkeypatch):
    # main table at k = 8 answers "5", the sweep at k = 2 answers "1": neither may write over the other's files
    _fake_generation(monkeypatch, lambda k: "5" if k == 8 else "1")
    out = tmp_path / "out"
    cfg = parse_cli(ev.EvalConfig, [f"data={lamp_root}", "tasks=LaMP-3", "checkpoints=sft=unused", "sweep_k=2",
                                    f"out_dir={out}", "prompt_style=full"])
    tables = ev.run(cfg)
    assert list(tables["robustness"].rows) == ["sft [recency k=2]"]
    _, main_preds = lamp.load_outputs(ev.predictions_file(out, "sft", "LaMP-3"))
    _, sweep_preds = lamp.load_outputs(ev.predictions_file(out, "sft [recency k=2]", "LaMP-3"))
    assert set(main_preds.values()) == {"5"} and set(sweep_preds.values()) == {"1"}


def test_a_decoded_row_under_normalize_is_scored_normalised_like_its_predictions_file(lamp_root, tmp_path,
                                                                                     monkeypatch):
    """normalize=true: the table scores the normalised answers, the ones its predictions file holds."""
    _fake_generation(monkeypatch, lambda k: " **4** stars")
    out = tmp_path / "out"
    cfg = parse_cli(ev.EvalConfig, [f"data={lamp_root}", "tasks=LaMP-3", "checkpoints=sft=unused", "normalize=true",
                                    f"out_dir={out}", "prompt_style=full"])
    table = ev.run(cfg)["table"]
    _, preds = lamp.load_outputs(ev.predictions_file(out, "sft", "LaMP-3"))
    assert set(preds.values()) == {"4"}
    assert table.rows["sft"]["LaMP-3"] == evaluate("LaMP-3", preds, ev.load_task_data(lamp_root, "LaMP-3").golds)


def test_the_sweep_reuses_the_main_tables_setting_instead_of_decoding_it_again(lamp_root, tmp_path, monkeypatch):
    decoded = []
    _fake_generation(monkeypatch, lambda k: decoded.append(k) or str(min(k, 5)))
    cfg = parse_cli(ev.EvalConfig, [f"data={lamp_root}", "tasks=LaMP-3", "checkpoints=sft=unused", "sweep_k=2,8,4",
                                    f"out_dir={tmp_path / 'out'}", "prompt_style=full"])
    tables = ev.run(cfg)
    assert sorted(decoded) == [2] * 3 + [4] * 3 + [8] * 3  # 3 questions per setting; k = 8 once: the main table's
    robust = tables["robustness"]
    assert list(robust.rows) == ["sft [recency k=2]", "sft [recency k=8]", "sft [recency k=4]"]  # sweep order
    assert robust.rows["sft [recency k=8]"] == tables["table"].rows["sft"]
    assert robust.counts["sft [recency k=8]"] == tables["table"].counts["sft"]


def test_one_engine_per_checkpoint_decodes_the_main_setting_and_the_sweep(lamp_root, tmp_path, monkeypatch):
    """The main table and the sweep each built every checkpoint's engine (2N vLLM engines in one process, whose
    memory a deleted engine keeps); a crash at checkpoint 2 keeps checkpoint 1's rows on disk."""
    _fake_generation(monkeypatch, lambda k: str(min(k, 5)))
    built = []
    monkeypatch.setattr(ev, "make_engine",  # load=False: input_problems reading the tokenizer only
                        lambda ckpt, *a, load=True, **kw: load and built.append(ckpt) or (None, None))
    out = tmp_path / "out"
    cfg = parse_cli(ev.EvalConfig, [f"data={lamp_root}", "tasks=LaMP-3", "checkpoints=a=A,b=B", "sweep_k=2,4",
                                    f"out_dir={out}", "prompt_style=full"])
    tables = ev.run(cfg)
    assert built == ["A", "B"]
    assert list(tables["table"].rows) == ["a", "b"]
    assert list(tables["robustness"].rows) == [f"{c} [recency k={k}]" for c in "ab" for k in (2, 4)]
    assert "partial" not in (out / "table.md").read_text()

    def crash_on_b(ckpt, *a, load=True, **kw):
        if ckpt == "B" and load:
            raise RuntimeError("out of memory")
        return None, None
    monkeypatch.setattr(ev, "make_engine", crash_on_b)
    with pytest.raises(RuntimeError, match="out of memory"):
        ev.run(dataclasses.replace(cfg, out_dir=str(tmp_path / "crash")))
    kept = json.loads((tmp_path / "crash" / "table.json").read_text())
    assert "(partial: 1 of 2 checkpoints)" in (tmp_path / "crash" / "table.md").read_text()
    assert list(kept["rows"]) == ["a"]


def test_a_sweep_without_checkpoints_is_refused():
    """Only prediction files: the sweep was dropped without a word and the title named a setting they never had."""
    with pytest.raises(ConfigError, match=r"sweep_k / sweep_retrievers decode checkpoints again"):
        parse_cli(ev.EvalConfig, ["data=demo", "tasks=LaMP-3", "predictions=a=p.json", "sweep_k=2"])


def test_pgraphrag_only_runs_never_read_the_demo_world(pgraphrag_dir, tmp_path, monkeypatch):
    # data defaults to "demo"; PGraphRAG tasks must neither need a demo world nor take its prompt style
    styles = []
    monkeypatch.setattr(ev, "make_engine", lambda *a, **kw: (None, None))

    def generate(engine, tokenizer, data, *, k, prompt_style, **kw):
        styles.append(prompt_style)
        return [{"id": ex.id, "text": "4", "profile_items": k} for ex in data.examples]
    monkeypatch.setattr(ev, "generate_answers", generate)
    cfg = parse_cli(ev.EvalConfig, ["--config", str(REPO / "recipes" / "configs" / "eval_pgraphrag.yaml"),
                                    f"pgraphrag_dir={pgraphrag_dir}", "limit=3", "checkpoints=m=unused",
                                    f"out_dir={tmp_path / 'out'}", "engine=builtin"])  # the config's vllm: not here
    tables = ev.run(cfg)
    assert set(tables["table"].rows["m"]) == {"PGraphRAG-title", "PGraphRAG-rating"}
    assert styles == ["full", "full"]
    # the title names the PGraphRAG file read, not data='s default "demo"
    assert (tmp_path / "out" / "table.md").read_text().startswith("### PGraphRAG amazon dev, first 3 per task, "
                                                                  "recency k=8\n")
    # the library call reads the domain it is given (it read amazon whatever it was told)
    hotel = ev.evaluate_checkpoints({"m": "unused"}, ["PGraphRAG-rating"], pgraphrag_dir=pgraphrag_dir,
                                    pgraphrag_domain="hotel", limit=2, checked=True, log=lambda *_: None)
    assert hotel.sources["m"]["PGraphRAG-rating"]["golds"] == str(Path(pgraphrag_dir) / "hotel_dev.json")


def test_two_files_for_one_row_and_task_are_an_error(lamp_root, tmp_path):
    td = ev.load_task_data(lamp_root, "LaMP-3")
    a = lamp.write_outputs(tmp_path / "a.json", "LaMP-3", td.golds)
    b = lamp.write_outputs(tmp_path / "b.json", "LaMP-3", dict.fromkeys(td.golds, "1"))
    with pytest.raises(ev.DataError, match="row 'gemini' already has LaMP-3 results"):
        ev.evaluate_prediction_files({"gemini": [a, b]}, [td])


def test_rows_sharing_an_output_folder_are_an_error(lamp_root, tmp_path):
    td = ev.load_task_data(lamp_root, "LaMP-3")
    gold = lamp.write_outputs(tmp_path / "g.json", "LaMP-3", td.golds)
    with pytest.raises(ev.DataError, match="share the output folder name 'Guided_RL'"):
        ev.evaluate_prediction_files({"Guided RL": [gold], "Guided_RL": [gold]}, [td])


def test_a_checkpoint_name_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="name\\(s\\) 'sft' given more than once"):
        parse_cli(ev.EvalConfig, ["tasks=LaMP-3", "checkpoints=sft=a,sft=b"])


def test_predictions_written_with_normalize_are_the_answers_as_scored(tmp_path):
    # normalize=true scores normalised answers; the file holds those, so the official rules re-score it to the table
    examples, golds = make_examples("LaMP-3", n=2, n_items=4, seed=3)
    td = ev.TaskData("LaMP-3", examples, golds, "x")
    records = [{"id": ex.id, "text": "<think>c</think> **4** stars"} for ex in examples]
    ev._write_outputs(tmp_path, "row", td, records, normalize=True)
    _, preds = lamp.load_outputs(ev.predictions_file(tmp_path, "row", "LaMP-3"))
    assert set(preds.values()) == {"4"}
    assert evaluate("LaMP-3", preds, golds) == ev.score(td, {r["id"]: r["text"] for r in records}, normalize=True)


def test_raw_generations_are_kept_per_row_and_task(two_rows):
    _, out = two_rows
    lines = (out / "generations" / "base" / "LaMP-3.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["id"] for r in records] == ["100", "101", "102"]
    assert all(1 <= r["completion_tokens"] <= 4 and r["profile_items"] == 6 for r in records)


def test_greedy_evaluation_is_deterministic(two_rows, lamp_root, checkpoints, tmp_path):
    # the generations, not the metrics: a random model's metrics sit at their floor whatever it decodes
    _, out = two_rows
    ev.evaluate_checkpoints({"sft": checkpoints["sft"]}, ["LaMP-2"], data=lamp_root, max_new_tokens=4,
                            out_dir=tmp_path, engine="builtin", log=lambda *_: None)
    texts = [[json.loads(x)["text"] for x in (o / "generations" / "sft" / "LaMP-2.jsonl").read_text().splitlines()]
             for o in (out, tmp_path)]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # distinct prompts gave distinct answers


def test_sweep_settings_make_one_row_per_retriever_and_k(lamp_root, checkpoints, tmp_path):
    table = ev.evaluate_checkpoints({"sft": checkpoints["sft"]}, ["LaMP-3"], data=lamp_root, max_new_tokens=2,
                                    settings=[("recency", 2), ("bm25", 4)], out_dir=tmp_path, engine="builtin",
                                    log=lambda *_: None)
    assert list(table.rows) == ["sft [recency k=2]", "sft [bm25 k=4]"]
    assert table.settings["sft [bm25 k=4]"]["retriever"] == "bm25"
    kept = [json.loads(x)["profile_items"] for x in (tmp_path / "generations" / "sft_bm25_k_4" / "LaMP-3.jsonl")
            .read_text().splitlines()]
    assert kept == [4, 4, 4]


def test_gold_prediction_files_score_perfectly(lamp_root, tmp_path):
    tasks = [ev.load_task_data(lamp_root, t) for t in ("LaMP-2", "LaMP-3")]
    files = []
    for td in tasks:
        files.append(lamp.write_outputs(tmp_path / f"{td.task}.json", td.task, td.golds))
    table = ev.evaluate_prediction_files({"oracle": files}, tasks)
    assert table.rows["oracle"]["LaMP-2"]["accuracy"] == 1.0
    assert table.rows["oracle"]["LaMP-3"]["mae"] == 0.0


def test_prediction_files_are_scored_as_given_unless_answers_are_extracted(lamp_root, tmp_path):
    # official rules: the file's outputs are the answers; raw responses are opted into with extract_answers
    td = ev.load_task_data(lamp_root, "LaMP-2")
    first = next(iter(td.golds))
    preds = {**td.golds, first: f"<think>chain</think> {td.golds[first]}"}
    path = lamp.write_outputs(tmp_path / "raw.json", td.task, preds)
    as_given = ev.evaluate_prediction_files({"raw": [path]}, [td]).rows["raw"]["LaMP-2"]["accuracy"]
    extracted = ev.evaluate_prediction_files({"raw": [path]}, [td], extract=True).rows["raw"]["LaMP-2"]["accuracy"]
    assert as_given == pytest.approx(1.0 - 1 / len(td.golds)) and extracted == 1.0


def test_prediction_file_for_a_task_not_evaluated_is_an_error(lamp_root, tmp_path):
    td = ev.load_task_data(lamp_root, "LaMP-2")
    stray = lamp.write_outputs(tmp_path / "l5.json", "LaMP-5", {"1": "x"})
    with pytest.raises(lamp.DataError, match=r"l5.json: predictions for LaMP-5"):
        ev.evaluate_prediction_files({"x": [stray]}, [td])


def test_gold_ids_without_a_question_are_an_error_not_a_silent_skip(tmp_path):
    # lamp-format.md: prediction and gold ids match one to one; an outputs file with an id no question has is broken
    examples, golds = make_examples("LaMP-3", n=2, n_items=4, seed=2)
    questions, outputs = lamp.split_files(tmp_path, "LaMP-3", "user", "dev")
    lamp.write_questions(questions, examples)
    lamp.write_outputs(outputs, "LaMP-3", {**golds, "no-such-question": "3"})
    for limit in (0, 1):
        with pytest.raises(lamp.DataError, match=r"dev_outputs\.json: gold output\(s\) for id\(s\) with no question: "
                                                 r"'no-such-question'"):
            ev.load_task_data(tmp_path, "LaMP-3", limit=limit)
    lamp.write_outputs(outputs, "LaMP-3", golds)
    assert len(ev.load_task_data(tmp_path, "LaMP-3", limit=1).golds) == 1  # a limit still scores a subset


def test_missing_task_files_name_the_path(tmp_path):
    # a DataError naming the file (the gold outputs are read first), never a bare FileNotFoundError traceback
    with pytest.raises(lamp.DataError, match=r"LaMP_3/dev/dev_outputs\.json: file not found"):
        ev.load_task_data(tmp_path, "LaMP-3")


def test_pgraphrag_task_loads_from_the_shared_data(pgraphrag_dir):
    td = ev.load_task_data("unused", "PGraphRAG-title", pgraphrag_dir=pgraphrag_dir, limit=5)
    assert td.task == "PGraphRAG-title" and len(td.examples) == 5
    assert set(td.golds) == {ex.id for ex in td.examples}


def test_config_needs_something_to_evaluate():
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        parse_cli(ev.EvalConfig, ["tasks=LaMP-3"])


@pytest.mark.parametrize("setting, key", [("data=/tmp/D\udcff", "data"), ("predictions=r\udcff=p.json", "predictions"),
                                          ("out_dir=/tmp/o\udcff", "out_dir")])
def test_a_name_or_path_that_is_not_utf8_is_refused_before_decoding(setting, key):
    """A path with a non-UTF-8 byte (read as a lone surrogate) failed in the UTF-8 write of the table, after all
    the decoding (pinned 2026-11-29)."""
    args = ["tasks=LaMP-3", "predictions=a=p.json", "data=/tmp/d"]
    args = [a for a in args if not a.startswith(key + "=")] + [setting]
    with pytest.raises(ConfigError, match=f"{key}: .* holds a lone UTF-16 surrogate"):
        parse_cli(ev.EvalConfig, args)


def test_a_row_name_given_to_both_checkpoints_and_predictions_is_an_error():
    with pytest.raises(ConfigError, match="row name\\(s\\) 'sft' given to both checkpoints= and predictions="):
        parse_cli(ev.EvalConfig, ["tasks=LaMP-3", "checkpoints=sft=a,base=b", "predictions=sft=p.json,gold=g.json"])


def test_command_line_writes_table_and_robustness(lamp_root, checkpoints, tmp_path):
    td = ev.load_task_data(lamp_root, "LaMP-3")
    gold_file = lamp.write_outputs(tmp_path / "gold.json", "LaMP-3", td.golds)
    cfg = parse_cli(ev.EvalConfig, [f"data={lamp_root}", "tasks=LaMP-3", f"checkpoints=sft={checkpoints['sft']}",
                                    f"predictions=oracle={gold_file}", "max_new_tokens=2", "sweep_k=1,2",
                                    f"out_dir={tmp_path / 'out'}", "engine=builtin"])
    tables = ev.run(cfg)
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert list(saved["rows"]) == ["oracle", "sft"]
    assert saved["rows"]["oracle"]["LaMP-3"]["mae"] == 0.0
    assert saved["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # where sft was decoded
    assert saved["machine"]["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    assert list(tables["robustness"].rows) == ["sft [recency k=1]", "sft [recency k=2]"]
    assert (tmp_path / "out" / "robustness.md").read_text().count("| sft [recency") == 2

    # the same out_dir again: an earlier evaluation is never replaced unasked (a quick limit=1 check would have
    # overwritten the full table under the same title), and with overwrite=true no earlier table is left beside it
    first = td.examples[0].id
    gold_file = lamp.write_outputs(tmp_path / "gold1.json", "LaMP-3", {first: td.golds[first]})
    quick = [f"data={lamp_root}", "tasks=LaMP-3", f"predictions=oracle={gold_file}", "limit=1",
             f"out_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=r"holds an earlier evaluation \(table.json, table.md, robustness.json, "
                                          r"robustness.md\); give another out_dir=, overwrite=true, or "
                                          r"resume=true"):
        ev.run(parse_cli(ev.EvalConfig, quick))
    assert json.loads((tmp_path / "out" / "table.json").read_text()) == saved
    ev.run(parse_cli(ev.EvalConfig, quick + ["overwrite=true"]))
    assert not (tmp_path / "out" / "robustness.md").exists() and not (tmp_path / "out" / "robustness.json").exists()
    table = (tmp_path / "out" / "table.md").read_text()
    # prediction files only: the title names no retrieval setting (they were decoded elsewhere, under their own)
    assert table.startswith(f"### {lamp_root} dev, user split, first 1 per task\n")
    again = json.loads((tmp_path / "out" / "table.json").read_text())
    questions, outputs = lamp.split_files(lamp_root, "LaMP-3", "user", "dev")
    assert again["sources"] == {"oracle": {"LaMP-3": {"predictions": str(gold_file), "questions": str(questions),
                                                      "golds": str(outputs), "limit": 1, "examples": 1}}}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_table_files_get_the_umasks_modes(two_rows, tmp_path, umask, mode):
    import os
    # two umasks: a fixed chmod 0644 after the write would pass the first one alone
    table, _ = two_rows
    old = os.umask(umask)
    try:
        md, js = table.write(tmp_path)
    finally:
        os.umask(old)
    assert {md.stat().st_mode & 0o777, js.stat().st_mode & 0o777} == {mode}  # mkstemp's files were 0600


def test_each_cell_records_its_own_file_and_a_normalised_file_says_so(lamp_root, tmp_path):
    """A row scored from two files keeps both paths (the first only was kept), and a predictions file that a
    normalize=true evaluation wrote is marked so when it is scored again under the official rules."""
    td3, td2 = ev.load_task_data(lamp_root, "LaMP-3"), ev.load_task_data(lamp_root, "LaMP-2")
    records = [{"id": ex.id, "text": "<think>c</think> **4** stars"} for ex in td3.examples]
    ev._write_outputs(tmp_path, "norm", td3, records, normalize=True)
    written = ev.predictions_file(tmp_path, "norm", "LaMP-3")
    assert json.loads(written.read_text())["minitagpr"] == {"normalize": True, "extract_answers": True}
    l2 = lamp.write_outputs(tmp_path / "l2.json", "LaMP-2", td2.golds)
    table = ev.evaluate_prediction_files({"gemini": [written, l2]}, [td3, td2])
    assert table.sources["gemini"]["LaMP-3"]["predictions"] == str(written)
    assert table.sources["gemini"]["LaMP-3"]["written_with"] == {"normalize": True, "extract_answers": True}
    assert table.sources["gemini"]["LaMP-2"]["predictions"] == str(l2)
    assert "written_with" not in table.sources["gemini"]["LaMP-2"]  # an official file carries no note
    assert any(f"{written} holds answers normalised when they were written" in n for n in table.notes)
    assert f"{written} holds answers normalised" in table.markdown()


def test_an_empty_questions_file_is_named_before_anything_is_decoded(tmp_path):
    questions, outputs = lamp.split_files(tmp_path, "LaMP-3", "user", "dev")
    lamp.write_questions(questions, [])
    lamp.write_outputs(outputs, "LaMP-3", {})
    with pytest.raises(ev.DataError, match=f"{questions}: no question records"):
        ev.load_task_data(tmp_path, "LaMP-3")


def test_demo_world_tasks_evaluate_end_to_end(tmp_path):
    from minitagpr.data import demo_world

    world = demo_world.build(tmp_path / "world", num_users=8, dev_users=2, test_users=0, per_user=2,
                             shared_per_user=1)
    ckpt = presets.make_tiny_checkpoint(tmp_path / "demo-base", preset="demo", tokenizer_dir=world.tokenizer_dir)
    table = ev.evaluate_checkpoints({"base": ckpt}, list(world.tasks), data=world, limit=2, max_new_tokens=4,
                                    max_prompt_tokens=768, engine="builtin", log=lambda *_: None)
    assert set(table.rows["base"]) == {"LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"}
    assert table.examples == dict.fromkeys(table.rows["base"], 2)


def test_builtin_engine_decodes_in_fp32_on_a_gpu_too(checkpoints, pretend_cuda):
    """bf16 logits make greedy ties (lowest id wins): a GPU table would not reproduce the CPU one."""
    import torch

    ev.make_engine(checkpoints["base"], kind="builtin")
    assert pretend_cuda == [(torch.float32, "cuda")]


def test_evaluation_gives_vllm_room_for_a_whole_prompt_and_answer(checkpoints, lamp_root, monkeypatch):
    # vLLM's default context (4096) would cut the paper configs' 4096 + 2048 tokens
    import minitagpr.rollout as R

    seen = {}

    class Recording:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("recorded")

    monkeypatch.setattr(R, "VLLMEngine", Recording)
    with pytest.raises(RuntimeError, match="recorded"):
        ev.evaluate_checkpoints({"base": checkpoints["base"]}, ["LaMP-3"], data=lamp_root, engine="vllm",
                                max_prompt_tokens=4096, max_new_tokens=2048, limit=1)
    assert seen["max_model_len"] == 6144


# ---- resume=true: a killed evaluation goes on where it stopped --------------------------------------------------

def _counting_engines(monkeypatch, crash_on=None):
    """make_engine that records every checkpoint it loads (and raises on `crash_on`, as a kill there would)."""
    real, loaded = _REAL_MAKE_ENGINE, []

    def make(checkpoint, *a, load=True, **kw):
        if load:
            loaded.append(Path(checkpoint).name)
            if Path(checkpoint).name == crash_on:
                raise RuntimeError("killed")
        return real(checkpoint, *a, load=load, **kw)
    monkeypatch.setattr(ev, "make_engine", make)
    return loaded


def test_resume_decodes_only_what_a_killed_run_did_not_finish(lamp_root, checkpoints, tmp_path, monkeypatch):
    args = [f"data={lamp_root}", "tasks=LaMP-3,LaMP-5", f"checkpoints=base={checkpoints['base']},"
            f"sft={checkpoints['sft']}", "max_new_tokens=4", "engine=builtin", "prompt_style=full"]
    whole = json.loads(json.dumps(ev.run(parse_cli(ev.EvalConfig, args + [f"out_dir={tmp_path / 'whole'}"]))
                                  ["table"].to_json()))
    cut = args + [f"out_dir={tmp_path / 'cut'}"]
    loaded = _counting_engines(monkeypatch, crash_on="sft")
    with pytest.raises(RuntimeError, match="killed"):
        ev.run(parse_cli(ev.EvalConfig, cut))
    assert loaded == ["base", "sft"]
    loaded = _counting_engines(monkeypatch)
    with pytest.raises(ConfigError, match="resume=true"):  # the partial table is an earlier evaluation
        ev.run(parse_cli(ev.EvalConfig, cut))
    resumed = json.loads(json.dumps(ev.run(parse_cli(ev.EvalConfig, cut + ["resume=true"]))["table"].to_json()))
    assert loaded == ["sft"]  # base's cells were read back: its weights never loaded
    for key in ("rows", "counts", "settings", "sources"):  # the engine that decoded base comes from its stamps
        assert resumed[key] == whole[key], key
    for row in ("base", "sft"):  # each decoded cell names its prediction file, beside table.json
        for task in ("LaMP-3", "LaMP-5"):
            predictions = whole["sources"][row][task]["predictions"]
            assert predictions == str(ev.predictions_file(".", row, task))  # predictions/<row>/LaMP_k_...
            assert (tmp_path / "whole" / predictions).is_file()
    for task in ("LaMP-3", "LaMP-5"):
        for row in ("base", "sft"):
            rel = Path("generations") / row / f"{task}.jsonl"
            assert (tmp_path / "cut" / rel).read_bytes() == (tmp_path / "whole" / rel).read_bytes()
    assert "partial" not in (tmp_path / "cut" / "table.md").read_text()
    loaded.clear()
    ev.run(parse_cli(ev.EvalConfig, cut + ["resume=true"]))
    assert loaded == []  # everything stamped: nothing loads
    ev.run(parse_cli(ev.EvalConfig, cut + ["resume=true", "max_new_tokens=3"]))
    assert loaded == ["base", "sft"]  # another decoding setting: nothing is reused


def test_resume_decodes_a_cell_again_when_its_inputs_or_file_changed(lamp_root, tmp_path, monkeypatch, capsys):
    import shutil
    decoded = []
    _fake_generation(monkeypatch, lambda k: decoded.append(k) or "4")
    lamp_root = shutil.copytree(lamp_root, tmp_path / "lamp")  # its questions are edited below
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"v1")
    out = tmp_path / "out"
    monkeypatch.setenv("HOME", str(tmp_path))  # checkpoints=sft=~/ckpt: the shell leaves a ~ after "=" as it is
    args = [f"data={lamp_root}", "tasks=LaMP-3", "checkpoints=sft=~/ckpt", f"out_dir={out}", "prompt_style=full",
            "resume=true"]
    ev.run(parse_cli(ev.EvalConfig, args))
    assert len(decoded) == 3
    stamp_file = out / "generations" / "sft" / "LaMP-3.stamp.json"
    stamp = json.loads(stamp_file.read_text())
    assert stamp["key"]["k"] == 8 and stamp["key"]["max_new_tokens"] == 2048 and len(stamp["sha256"]) == 64
    assert stamp["key"]["checkpoint_files"]["folder"] == str(ckpt.resolve())  # the folder ~ resolves to
    ev.run(parse_cli(ev.EvalConfig, args + ["seed=5"]))
    assert len(decoded) == 3  # reused (greedy decoding and a recency retriever never read the seed)
    stamp["machine"] = {**stamp["machine"], "cpu": "another CPU"}  # decoded elsewhere before a rescheduled resume
    stamp_file.write_text(json.dumps(stamp))
    notes = ev.run(parse_cli(ev.EvalConfig, args))["table"].notes
    assert len(decoded) == 3 and notes == ["sft LaMP-3: generations decoded by an earlier run on another CPU ("
                                           f"{stamp['machine']['cpu_capability']}), no GPU, torch "
                                           f"{stamp['machine']['torch']}, 1 process (resume=true)"]
    gen = out / "generations" / "sft" / "LaMP-3.jsonl"
    gen.write_text(gen.read_text().replace("</think>4", "</think>5"))  # edited after it was stamped
    ev.run(parse_cli(ev.EvalConfig, args))
    assert len(decoded) == 6
    (ckpt / "model.safetensors").write_bytes(b"v2, re-exported")  # the same path, other weights
    ev.run(parse_cli(ev.EvalConfig, args))
    assert len(decoded) == 9
    ev.run(parse_cli(ev.EvalConfig, args + ["limit=2"]))  # other questions
    assert len(decoded) == 11
    capsys.readouterr()
    ev.run(parse_cli(ev.EvalConfig, args + ["k=2"]))  # another setting
    assert len(decoded) == 14
    assert "eval sft LaMP-3: not reused (examples changed; k 8 -> 2); decoding it again" in capsys.readouterr().out
    ev.run(parse_cli(ev.EvalConfig, args))  # k=8 again (k=2 stamped the row's cells in its place)
    ev.run(parse_cli(ev.EvalConfig, args))
    assert len(decoded) == 17
    questions = lamp.split_files(lamp_root, "LaMP-3", "user", "dev")[0]
    records = json.loads(questions.read_text())
    records[0]["input"] += " (edited)"  # the same ids, another question
    questions.write_text(json.dumps(records))
    ev.run(parse_cli(ev.EvalConfig, args))
    assert len(decoded) == 20


def test_resume_reuses_generations_that_hold_unicode_line_breaks(lamp_root, tmp_path, monkeypatch, capsys):
    # JSONL lines end at "\n" alone: U+2028, U+2029 and U+0085 (a cp1252 "..." read as Latin-1) stay unescaped
    # inside a record, and a reader that splits where str.splitlines does crashed the resume with a JSONDecodeError
    decoded = []
    _fake_generation(monkeypatch, lambda k: decoded.append(k) or "4\u2028\u2029\x85\r")
    args = [f"data={lamp_root}", "tasks=LaMP-3", "checkpoints=sft=unused", f"out_dir={tmp_path / 'out'}",
            "prompt_style=full", "resume=true"]
    first = ev.run(parse_cli(ev.EvalConfig, args))["table"]
    gen = tmp_path / "out" / "generations" / "sft" / "LaMP-3.jsonl"
    assert "\u2028" in gen.read_text(encoding="utf-8") and len(decoded) == 3
    again = ev.run(parse_cli(ev.EvalConfig, args))["table"]
    assert len(decoded) == 3 and again.rows == first.rows and "not reused" not in capsys.readouterr().out
    stamp_file = gen.with_name("LaMP-3.stamp.json")  # a stamped file that is no JSONL is decoded again, with why
    gen.write_bytes(b"[1, 2\n")
    stamp = json.loads(stamp_file.read_text())
    stamp_file.write_text(json.dumps({**stamp, "sha256": hashlib.sha256(b"[1, 2\n").hexdigest()}))
    ev.run(parse_cli(ev.EvalConfig, args))
    assert len(decoded) == 6 and f"not reused ({gen} is not JSONL (" in capsys.readouterr().out


def test_resume_reuses_a_cell_stamped_under_another_row_name(lamp_root, tmp_path, monkeypatch, capsys):
    """checkpoints=sft=DIR renamed to checkpoints=tuned=DIR decoded every cell again: the stamps were looked up only
    under the row's own name. A cell stamped under exactly this run's key in another row's folder is reused, and
    copied (generations and stamp) into the new row's folder."""
    decoded = []
    _fake_generation(monkeypatch, lambda k: decoded.append(k) or "4")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"v1")
    out = tmp_path / "out"
    args = [f"data={lamp_root}", "tasks=LaMP-3", f"out_dir={out}", "prompt_style=full", "resume=true"]
    ev.run(parse_cli(ev.EvalConfig, args + [f"checkpoints=sft={ckpt}"]))
    assert len(decoded) == 3
    capsys.readouterr()
    renamed = ev.run(parse_cli(ev.EvalConfig, args + [f"checkpoints=tuned={ckpt}"]))["table"]
    assert len(decoded) == 3 and list(renamed.rows) == ["tuned"]
    assert "eval tuned LaMP-3: reusing the stamped generations of generations/sft/" in capsys.readouterr().out
    old, new = out / "generations" / "sft", out / "generations" / "tuned"
    assert (new / "LaMP-3.jsonl").read_bytes() == (old / "LaMP-3.jsonl").read_bytes()
    assert json.loads((new / "LaMP-3.stamp.json").read_text()) == json.loads((old / "LaMP-3.stamp.json").read_text())
    (ckpt / "model.safetensors").write_bytes(b"v2")  # other weights: neither row's stamp matches any more
    ev.run(parse_cli(ev.EvalConfig, args + [f"checkpoints=again={ckpt}"]))
    assert len(decoded) == 6
    ev.run(parse_cli(ev.EvalConfig, args + [f"checkpoints=again={ckpt}", "k=2"]))  # another setting: not reused
    assert len(decoded) == 9
    capsys.readouterr()
    ev.run(parse_cli(ev.EvalConfig, args + [f"checkpoints=again={ckpt}", "k=3"]))  # nowhere: the own row's reason
    said = capsys.readouterr().out
    assert len(decoded) == 12 and "eval again LaMP-3: not reused (k 2 -> 3); decoding it again" in said
    (ckpt / "model.safetensors").write_bytes(b"v1")  # back to sft's weights: its cell, not again's reason
    ev.run(parse_cli(ev.EvalConfig, args + [f"checkpoints=again={ckpt}"]))
    said = capsys.readouterr().out
    assert len(decoded) == 12 and "not reused" not in said and "of generations/sft/" in said


def test_an_empty_task_list_is_refused():
    """tasks= wrote a table with no column and exited 0."""
    with pytest.raises(ConfigError, match="tasks= is empty"):
        parse_cli(ev.EvalConfig, ["tasks=", "checkpoints=a=A"])


def test_a_diverged_checkpoint_is_named_with_its_task(lamp_root, checkpoints, tmp_path):
    """Non-finite logits named a batch index only ("prompt_token_ids[0], sample 0: ..."), not the checkpoint."""
    import shutil
    from safetensors.torch import load_file, save_file
    from minitagpr.rollout.base import DivergedError
    bad = shutil.copytree(checkpoints["sft"], tmp_path / "nan")
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.embed_tokens.weight"][:] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DivergedError, match=rf"checkpoints=bad \({bad}\), LaMP-3: .*not finite.*NaN or Inf"):
        ev.evaluate_checkpoints({"bad": bad}, ["LaMP-3"], data=lamp_root, max_new_tokens=2, engine="builtin",
                                log=lambda *_: None)


def test_a_demo_world_the_user_points_at_is_evaluated_as_it_was_built(tmp_path, monkeypatch):
    """data=demo data_dir=<a world built with other parameters> rebuilt it with the defaults over the user's files
    (34 users instead of 8) and scored that, without a word."""
    from minitagpr.data import demo_world
    world = demo_world.build(tmp_path / "world", num_users=8, dev_users=2, test_users=0, per_user=2,
                             shared_per_user=1)
    manifest = (tmp_path / "world" / "world.json").read_bytes()
    _fake_generation(monkeypatch, lambda k: "4")
    table = ev.run(parse_cli(ev.EvalConfig, ["data=demo", f"data_dir={world.root}", "tasks=LaMP-3",
                                             "checkpoints=a=A", f"out_dir={tmp_path / 'out'}"]))["table"]
    assert (tmp_path / "world" / "world.json").read_bytes() == manifest  # not rebuilt
    assert table.examples == {"LaMP-3": 2 * 2}  # its 2 dev users x 2 questions
