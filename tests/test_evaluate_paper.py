"""recipes/evaluate.py at paper scale: every input is checked before anything is decoded (a bad last checkpoint, a
broken prediction file, an over-long question, a dense encoder that cannot load), one process only, and a table that
says which engine ran, with which limits, and how many generations the length limit cut."""
import json
import runpy
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lamp_fixtures import make_examples
from recipe_modules import load_recipe
from minitagpr import rewards
from minitagpr.config import ConfigError, parse_cli
from minitagpr.data import answers, lamp, prompts
from minitagpr.model import presets
from minitagpr.rollout import Completion
from minitagpr.rollout import base as rollout_base
from minitagpr.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

ev = load_recipe("evaluate", "recipe_evaluate")

LONG_ID = "101"  # the LaMP-5 question whose prompt is over max_prompt_tokens even without profile items
MAX_PROMPT = 1000


@pytest.fixture(scope="module")
def lamp_root(tmp_path_factory):
    """LaMP-3 and LaMP-5 dev sets; LaMP-5 question LONG_ID has a ~2,000-token abstract."""
    root = tmp_path_factory.mktemp("lamp")
    for task in ("LaMP-3", "LaMP-5"):
        examples, golds = make_examples(task, n=3, n_items=4, seed=1)
        if task == "LaMP-5":
            examples = [replace(ex, input=ex.input + " learning" * 2000) if ex.id == LONG_ID else ex
                        for ex in examples]
        questions, outputs = lamp.split_files(root, task, "user", "dev")
        lamp.write_questions(questions, examples)
        lamp.write_outputs(outputs, task, golds)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    return presets.make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0,
                                        tokenizer_dir=tiny_tokenizer_dir)


def _record_decoding(monkeypatch) -> list:
    """generate_answers as it is, recording each (task, k) it decodes."""
    decoded, real = [], ev.generate_answers

    def recording(engine, tokenizer, data, **kw):
        decoded.append((data.task, kw["k"]))
        return real(engine, tokenizer, data, **kw)
    monkeypatch.setattr(ev, "generate_answers", recording)
    return decoded


def _cfg(lamp_root, tmp_path, *args):
    return parse_cli(ev.EvalConfig, [f"data={lamp_root}", f"out_dir={tmp_path / 'out'}", "engine=builtin",
                                     "max_new_tokens=2", "prompt_style=full", *args])


# ----------------------------------------------------------------------------------------------- checked up front
def test_every_bad_checkpoint_and_prediction_file_is_named_in_one_line_before_any_decoding(
        lamp_root, checkpoint, tmp_path, monkeypatch):
    no_tokenizer = shutil.copytree(checkpoint, tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    decoded = _record_decoding(monkeypatch)
    cfg = _cfg(lamp_root, tmp_path, "tasks=LaMP-3",
               f"checkpoints=a={checkpoint},b={no_tokenizer},c={tmp_path / 'typo'}",
               f"predictions=p={tmp_path / 'missing.json'}")
    with pytest.raises(lamp.DataError) as err:
        ev.run(cfg)
    message = str(err.value)
    assert decoded == [] and "\n" not in message
    assert f"checkpoints=b: tokenizer folder {no_tokenizer} lacks tokenizer.json" in message
    assert f"checkpoints=c: {tmp_path / 'typo'}: no such checkpoint folder" in message
    assert f"{tmp_path / 'missing.json'}: file not found" in message
    assert "checkpoints=a" not in message


def test_a_checkpoint_with_broken_weights_is_found_before_any_decoding(lamp_root, checkpoint, tmp_path,
                                                                       monkeypatch):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 4)
    decoded = _record_decoding(monkeypatch)
    with pytest.raises(lamp.DataError, match=r"checkpoints=z: .*model\.safetensors: truncated safetensors file"):
        ev.run(_cfg(lamp_root, tmp_path, "tasks=LaMP-3", f"checkpoints=a={checkpoint},z={broken}"))
    assert decoded == []


def test_an_over_long_question_is_named_before_any_task_is_decoded(lamp_root, checkpoint, tmp_path, monkeypatch):
    # LaMP-3 comes first and fits; the old code decoded it, then stopped at LaMP-5 with nothing written
    decoded = _record_decoding(monkeypatch)
    with pytest.raises(lamp.DataError) as err:
        ev.run(_cfg(lamp_root, tmp_path, "tasks=LaMP-3,LaMP-5", f"checkpoints=a={checkpoint}",
                    f"max_prompt_tokens={MAX_PROMPT}"))
    tokenizer = Tokenizer.from_dir(checkpoint)
    long_ex = next(ex for ex in lamp.load_questions(lamp.split_files(lamp_root, "LaMP-5")[0], "LaMP-5")
                   if ex.id == LONG_ID)
    with pytest.raises(prompts.PromptTooLongError) as refused:  # the count decoding would refuse it with
        prompts.fit_messages(long_ex, long_ex.profile, tokenizer, MAX_PROMPT, style="full")
    n = int(str(refused.value).split("the prompt is ")[1].split()[0])
    assert decoded == []
    assert str(err.value) == (f"1 question(s) need more than max_prompt_tokens={MAX_PROMPT} tokens without any "
                              f"profile item: LaMP-5 id '{LONG_ID}' ({n} tokens); a question is never cut, so raise "
                              f"max_prompt_tokens to at least {n}")


def test_the_question_check_refuses_exactly_what_fit_messages_refuses(lamp_root, checkpoint):
    tokenizer = Tokenizer.from_dir(checkpoint)
    td = ev.load_task_data(lamp_root, "LaMP-5")
    [(task, qid, n)] = ev.long_questions(tokenizer, [td], MAX_PROMPT, "full")
    assert (task, qid) == ("LaMP-5", LONG_ID)
    long_ex = next(ex for ex in td.examples if ex.id == LONG_ID)
    assert ev.long_questions(tokenizer, [td], n, "full") == []  # at the budget: fits, with no profile item
    assert prompts.fit_messages(long_ex, long_ex.profile, tokenizer, n, style="full")[1] == 0
    assert ev.long_questions(tokenizer, [td], n - 1, "full") == [("LaMP-5", LONG_ID, n)]


def test_a_dense_encoder_that_cannot_load_is_found_before_the_main_table_is_decoded(lamp_root, tmp_path,
                                                                                       monkeypatch):
    decoded = []
    monkeypatch.setattr(ev, "make_engine", lambda *a, **kw: (None, None))
    monkeypatch.setattr(ev, "generate_answers", lambda engine, tok, data, **kw: decoded.append(data.task) or [
        {"id": ex.id, "text": "3", "finish_reason": "stop"} for ex in data.examples])
    with pytest.raises(lamp.DataError) as err:  # named in the same line as the other bad inputs
        ev.run(_cfg(lamp_root, tmp_path, "tasks=LaMP-3", "checkpoints=a=unused", "sweep_retrievers=dense",
                    f"dense_encoder={tmp_path / 'no_encoder'}", f"predictions=p={tmp_path / 'missing.json'}"))
    assert "retriever dense: " in str(err.value) and "no_encoder: no such checkpoint folder" in str(err.value)
    assert "missing.json" in str(err.value)
    assert decoded == []


def test_all_bad_prediction_files_are_named_together(lamp_root, tmp_path):
    td = ev.load_task_data(lamp_root, "LaMP-3")
    short = lamp.write_outputs(tmp_path / "short.json", "LaMP-3", dict(list(td.golds.items())[1:]))
    other = lamp.write_outputs(tmp_path / "other.json", "LaMP-5", {"1": "x"})
    with pytest.raises(lamp.DataError) as err:
        ev.evaluate_prediction_files({"x": [short], "y": [other]}, [td])
    assert str(err.value).startswith(f"{short}: prediction ids must match gold ids one to one")
    assert f" | {other}: predictions for LaMP-5, which is not among the evaluated tasks" in str(err.value)


def test_a_missing_gold_is_reported_against_the_outputs_file(tmp_path):
    examples, golds = make_examples("LaMP-3", n=3, n_items=4, seed=2)
    questions, outputs = lamp.split_files(tmp_path, "LaMP-3", "user", "dev")
    lamp.write_questions(questions, examples)
    lamp.write_outputs(outputs, "LaMP-3", {i: g for i, g in golds.items() if i != "101"})
    with pytest.raises(lamp.DataError) as err:
        ev.load_task_data(tmp_path, "LaMP-3")
    assert str(err.value) == f"{outputs}: no gold output for question id(s) '101' of {questions}"


def test_a_missing_pgraphrag_file_points_to_pgraphrag_dir(tmp_path):
    with pytest.raises(lamp.DataError, match=r"amazon_dev\.json: file not found .*set pgraphrag_dir= to the folder "
                                             r"that holds amazon_dev\.json"):
        ev.load_task_data("unused", "PGraphRAG-title", pgraphrag_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- one process
def test_torchrun_is_refused_with_how_to_split_and_combine(lamp_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(ev, "make_engine", lambda *a, **kw: pytest.fail("a rank started on the whole job"))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", f"data={lamp_root}", "tasks=LaMP-3", "checkpoints=a=unused",
                                      f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "recipes" / "evaluate.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith("[evaluate] error (rank 1): evaluate runs as one process, not under torchrun (WORLD_SIZE=2)")
    assert "CUDA_VISIBLE_DEVICES=0 python recipes/evaluate.py" in err and "predictions=sft=" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- what the table says
class FakeVLLM:
    """Stands in for VLLMEngine: records its keyword arguments; odd prompts reach the length limit mid-thought."""
    seen: dict = {}

    def __init__(self, folder, tokenizer, **kwargs):
        FakeVLLM.seen = kwargs

    def generate(self, ids, n, temperature, top_p, max_new_tokens, stop_token_ids, seed):
        def completion(i):
            if i % 2:
                return Completion([7] * max_new_tokens, "<think>still", [0.0] * max_new_tokens, "length")
            return Completion([7, stop_token_ids[0]], "<think>c</think>3", [0.0, 0.0], "stop")
        return [[completion(i)] for i in range(len(ids))]


@pytest.fixture
def fake_vllm(monkeypatch):
    import minitagpr.rollout as R

    monkeypatch.setattr(R, "VLLMEngine", FakeVLLM)
    monkeypatch.setattr(R, "vllm_available", lambda: True)
    FakeVLLM.seen = {}


@pytest.mark.parametrize("setting, share", [((), 0.3), (("vllm_gpu_memory_utilization=0.9",), 0.9)])
def test_vllm_gets_its_share_of_the_gpu_from_the_config(setting, share, fake_vllm, lamp_root, checkpoint, tmp_path):
    ev.run(_cfg(lamp_root, tmp_path, "tasks=LaMP-3", f"checkpoints=a={checkpoint}", "engine=vllm", *setting))
    assert FakeVLLM.seen["gpu_memory_utilization"] == share


def test_the_table_records_the_engine_that_ran_its_limits_and_the_cut_generations(fake_vllm, lamp_root, checkpoint,
                                                                                   tmp_path):
    ev.run(_cfg(lamp_root, tmp_path, "tasks=LaMP-3", f"checkpoints=a={checkpoint}", "engine=vllm",
                "max_prompt_tokens=900", "max_new_tokens=5"))
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    settings = saved["settings"]["a"]
    assert (settings["engine"], settings["dtype"]) == ("vllm", "bfloat16")
    assert (settings["max_prompt_tokens"], settings["max_new_tokens"]) == (900, 5)
    counts = saved["counts"]["a"]["LaMP-3"]
    assert {k: counts[k] for k in ("generations", "cut_by_length", "no_answer")} == {
        "generations": 3, "cut_by_length": 1, "no_answer": 1}  # prompt 1 of 0-2
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| method | L3 MAE | L3 RMSE | cut |" in md
    assert next(line for line in md.splitlines() if line.startswith("| a |")).endswith(" | 1 |")


def test_engine_auto_records_the_builtin_fallback_and_counts_from_the_generations(lamp_root, checkpoint, tmp_path):
    table = ev.evaluate_checkpoints({"a": checkpoint}, ["LaMP-3"], data=lamp_root, max_new_tokens=3, engine="auto",
                                    out_dir=tmp_path, log=lambda *_: None)
    assert (table.settings["a"]["engine"], table.settings["a"]["dtype"]) == ("builtin", "float32")  # no vLLM here
    records = [json.loads(x) for x in (tmp_path / "generations" / "a" / "LaMP-3.jsonl").read_text().splitlines()]
    assert table.counts["a"]["LaMP-3"] == {
        "generations": 3, "cut_by_length": sum(r["finish_reason"] == "length" for r in records),
        "no_answer": sum(answers.extract_answer(r["text"]) == "" for r in records),
        "format_ok": sum(r["finish_reason"] == "stop" and rewards.format_reward(r["text"]) == 1 for r in records),
        "tags_ok": sum(rewards.tag_reward(rewards.split_response(r["text"])[0]) == 0 for r in records),
        "profile_cut": sum(r["profile_items"] < r["profile_items_retrieved"] for r in records)}


def test_generation_counts_by_hand():
    records = [{"text": "<think>a</think> 3", "finish_reason": "stop"},
               {"text": "<think>a, b, c", "finish_reason": "length"},  # cut inside the chain: no answer either
               {"text": "<think>a</think>", "finish_reason": "stop"},  # closed, nothing after it
               {"text": "<think>a</think> 4 4 4", "finish_reason": "length"}]  # cut after an answer began
    tagged = "<think><analyze_input>a</analyze_input><examine_examples>b</examine_examples><make_decision>c" \
             "</make_decision></think>"
    records += [{"text": tagged + " 2", "finish_reason": "stop"},  # passes the format gate and the tag check
                {"text": tagged + " 2 2", "finish_reason": "length"},  # well-tagged, but cut: R_f = 0
                {"text": tagged.replace("examine_examples", "daydream") + " 2", "finish_reason": "stop"}]  # a tenth tag
    records[0].update(profile_items=2, profile_items_retrieved=4)  # the prompt budget left 2 out
    records[1].update(profile_items=4, profile_items_retrieved=4)
    assert ev.generation_counts(records) == {"generations": 7, "cut_by_length": 3, "no_answer": 2,
                                             "format_ok": 3, "tags_ok": 2, "profile_cut": 1}  # format_ok: 0, 4, 6


@pytest.mark.parametrize("yaml_name", ["eval_lamp.yaml", "eval_robustness.yaml", "eval_pgraphrag.yaml"])
def test_paper_configs_decode_with_vllm_rather_than_fall_back_to_fp32(yaml_name):
    cfg = parse_cli(ev.EvalConfig, ["--config", str(REPO / "recipes" / "configs" / yaml_name), "checkpoints=t=c",
                                    "data=/data/LaMP", "dense_encoder=enc"])
    assert cfg.engine == "vllm" and cfg.vllm_gpu_memory_utilization == 0.3


@pytest.mark.parametrize("share", ["0", "1.5"])
def test_a_gpu_share_outside_0_to_1_is_refused_by_name(share):
    with pytest.raises(ConfigError, match=r"vllm_gpu_memory_utilization must be in \(0, 1\]"):
        parse_cli(ev.EvalConfig, ["checkpoints=t=c", "tasks=LaMP-3", f"vllm_gpu_memory_utilization={share}"])


def test_a_checkpoint_trained_with_another_prompt_style_is_refused_before_decoding(lamp_root, checkpoint, tmp_path,
                                                                                     monkeypatch):
    from minitagpr.data.prompts import TRAINING_FILE
    brief = shutil.copytree(checkpoint, tmp_path / "brief")
    (brief / TRAINING_FILE).write_text('{"prompt_style": "brief"}')
    decoded = _record_decoding(monkeypatch)
    with pytest.raises(lamp.DataError, match=r"checkpoints=b: trained with prompt_style=brief .*evaluated with "
                                             r"prompt_style=full; pass prompt_style=brief"):
        ev.run(_cfg(lamp_root, tmp_path, "tasks=LaMP-3", f"checkpoints=a={checkpoint},b={brief}"))
    assert decoded == []


def test_the_cut_column_sums_the_cut_generations_over_a_rows_tasks():
    """The table's last column "cut" is the number of generations max_new_tokens stopped, summed over the row's
    tasks (2 on LaMP-3 + 3 on LaMP-5 = 5), not the number of tasks; a row scored from prediction files has "—".
    Pinned by mutation, 2026-11-29."""
    table = ev.EvalTable()
    counts = {"LaMP-3": 2, "LaMP-5": 3}
    for task, metrics in (("LaMP-3", {"mae": 0.5, "rmse": 0.75}), ("LaMP-5", {"rouge1": 0.4, "rougeL": 0.3})):
        table.add("decoded", task, metrics, {}, 4, counts={"cut_by_length": counts[task]})
        table.add("file", task, metrics, {}, 4)
    lines = table.markdown().splitlines()
    assert lines[0] == "| method | L3 MAE | L3 RMSE | L5 R-1 | L5 R-L | cut |"
    assert lines[2] == "| decoded | .500 | .750 | .400 | .300 | 5 |"
    assert lines[3] == "| file | .500 | .750 | .400 | .300 | — |"


def test_each_example_is_seeded_by_its_place_in_the_file_whatever_the_batch(lamp_root, checkpoint):
    """The seed was seed + batch start for a whole call: sampled answers (temperature > 0) changed with
    batch_prompts, and seed=0's second batch replayed seed=16's first."""
    data = ev.load_task_data(lamp_root, "LaMP-3")
    tok = Tokenizer.from_dir(checkpoint)

    class Recording:
        def generate(self, ids, n, temperature, top_p, max_new_tokens, stop_token_ids, seed):
            seen.extend(seed)
            return [[Completion([1], "<think>c</think>3", [0.0], "stop")] for _ in ids]

    by_batch = {}
    for batch in (1, 2):
        seen = []
        ev.generate_answers(Recording(), tok, data, k=1, temperature=1.0, seed=7, batch_prompts=batch)
        by_batch[batch] = seen
    assert by_batch[1] == by_batch[2] == [rollout_base.sample_base(7, i) for i in range(len(data.examples))]


def test_each_record_says_how_many_retrieved_items_the_prompt_budget_left_out(lamp_root, checkpoint):
    """profile_items_retrieved written as the kept count made the table's profile_cut always 0 (a mutant)."""
    data = ev.load_task_data(lamp_root, "LaMP-3")
    data = ev.TaskData(data.task, data.examples[:1], data.golds, data.source)
    ex, tok = data.examples[0], Tokenizer.from_dir(checkpoint)
    items = ex.profile[:4]
    size = {n: len(tok.apply_chat(prompts.build_messages(ex, items[:n], style="full"), add_generation_prompt=True))
            for n in (1, 4)}
    budget = (size[1] + size[4]) // 2  # room for some of the 4 retrieved items, not all of them

    class Recording:
        def generate(self, ids, n, temperature, top_p, max_new_tokens, stop_token_ids, seed):
            return [[Completion([1], "<think>c</think>3", [0.0], "stop")] for _ in ids]

    [record] = ev.generate_answers(Recording(), tok, data, k=4, max_prompt_tokens=budget, prompt_style="full")
    assert record["profile_items_retrieved"] == 4 and 1 <= record["profile_items"] < 4
    assert record["prompt_tokens"] <= budget
