"""End to end over written fixtures: every LaMP task and both splits load, retrieve, render and score."""
import pytest

from lamp_fixtures import LAMP_TASKS, make_examples
from minitagpr.data.lamp import TASKS, load_outputs, load_questions, split_files, write_outputs, write_questions
from minitagpr.data.prompts import build_messages
from minitagpr.data.retrieval import get_retriever
from minitagpr.metrics import evaluate, main


@pytest.mark.parametrize("split", ["user", "time"])
@pytest.mark.parametrize("task", LAMP_TASKS)
def test_fixture_files_load_retrieve_render_and_score(tmp_path, task, split):
    examples, golds = make_examples(task, n=3, n_items=10, split=split)
    q_path, o_path = split_files(tmp_path, task, split, "dev")
    write_questions(q_path, examples)
    write_outputs(o_path, task, golds)

    loaded = load_questions(q_path, task)
    file_task, loaded_golds = load_outputs(o_path)
    assert file_task == task
    for name in ("recency", "bm25", "random"):
        retriever = get_retriever(name, seed=1)
        for ex in loaded:
            items = retriever.select(ex, 4)
            user_turn = build_messages(ex, items)[1]["content"]
            assert len(items) == 4 and user_turn.endswith(ex.input) and "[4] " in user_turn

    perfect = evaluate(task, loaded_golds, loaded_golds)
    kind = TASKS[task].kind
    if kind == "label":
        assert perfect["accuracy"] == 1.0
    elif kind == "rating":
        assert perfect == {"mae": 0.0, "rmse": 0.0}
    else:
        assert perfect["rouge1"] == pytest.approx(1.0) and perfect["rougeL"] == pytest.approx(1.0)

    wrong = {i: "not an answer" for i in loaded_golds}
    write_outputs(tmp_path / "pred.json", task, wrong)
    assert main([str(tmp_path / "pred.json"), str(o_path)]) == 0
    worse = evaluate(task, wrong, loaded_golds)
    assert (worse.get("accuracy", 0.0) == 0.0 and worse.get("rouge1", 0.0) < 1.0 and worse.get("mae", 1.0) > 0.0)
