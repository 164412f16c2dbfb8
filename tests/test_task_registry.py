"""The task registry (minitagpr.data.lamp.TASKS): one TaskSpec holds every per-task fact; prompts, answers and metrics
read it; a spec missing a field fails when it is built, in one line naming the task and the field."""
import dataclasses

import pytest

from minitagpr import metrics
from minitagpr.data import answers, lamp, prompts
from minitagpr.data.lamp import DataError, LampExample, TaskSpec

TOY = dict(
    name="Toy-1", file_name="Toy_1", kind="label", labels=("agree", "disagree"), positive_label="agree",
    item_fields=("text", "stance"), doc_fields=("text",), query_marker="post:", folder="toy_posts",
    item_layout=(("post", "text", True), ("stance", "stance", False)), history_name="posts this user has judged",
    answer_form='exactly "agree" or "disagree"', answer_rule="label",
    columns=(("accuracy", "Toy acc"), ("f1_positive", "Toy F1"), ("f1_macro", "Toy F1-macro")),
)
REQUIRED = ("file_name", "kind", "item_fields", "doc_fields", "query_marker", "item_layout", "history_name",
            "answer_form", "answer_rule", "columns")


@pytest.fixture
def toy():
    spec = lamp.register_task(TaskSpec(**TOY))
    try:
        yield spec
    finally:
        del lamp.TASKS[spec.name]


def _example(qid="7"):
    profile = [{"id": f"{qid}0", "text": "cats are great pets", "stance": "agree", "date": "2020-01-02"},
               {"id": f"{qid}1", "text": "dogs bark all night", "stance": "disagree", "date": "2021-05-06"}]
    return LampExample(qid, "Toy-1", "Does this user agree with the post? post: cats rule", profile)


# --- a registered toy task works end to end ----------------------------------------------------------------------

def test_toy_task_files_round_trip_under_its_folder_and_file_name(toy, tmp_path):
    q_path, o_path = lamp.split_files(tmp_path, "toy_1", "user", "dev")
    assert q_path == tmp_path / "toy_posts/dev/dev_questions.json"
    lamp.write_questions(q_path, [_example()])
    lamp.write_outputs(o_path, "Toy-1", {"7": "agree"})
    (ex,) = lamp.load_questions(q_path, "Toy_1")
    assert ex.task == "Toy-1" and lamp.query_text(ex) == "cats rule"
    assert lamp.item_document("Toy-1", ex.profile[0]) == "cats are great pets"
    assert lamp.load_outputs(o_path, "Toy-1") == ("Toy-1", {"7": "agree"})


def test_toy_task_prompt_shows_its_layout_history_name_and_answer_form(toy):
    system, user = prompts.build_messages(_example(), _example().profile)
    assert 'write only the answer: exactly "agree" or "disagree".' in system["content"]
    assert user["content"].startswith("Some posts this user has judged (2, most relevant first):\n"
                                      "[1] post: cats are great pets\n    stance: agree\n[2] post: dogs bark")
    assert prompts.ANSWER_FORMS["Toy-1"] == TOY["answer_form"] and prompts.ITEM_LAYOUT["Toy-1"] == TOY["item_layout"]


def test_toy_task_answers_follow_its_rule_and_labels(toy):
    assert answers.is_classification("Toy-1") and "Toy-1" in answers.CLASSIFICATION_TASKS
    assert answers.normalize("Toy-1", " Disagree. ") == "disagree"
    assert answers.normalize("Toy-1", " Disagree. ", enabled=False) == "Disagree."
    assert answers.LABELS["Toy-1"] == ["agree", "disagree"] and list(answers.TASKS)[-1] == "Toy-1"


def test_toy_task_is_scored_and_gets_its_table_columns(toy):
    result = metrics.evaluate("Toy-1", {"a": "agree", "b": "x"}, {"a": "agree", "b": "disagree"})
    assert result == {"accuracy": 0.5, "f1_macro": 0.5, "f1_positive": 1.0}  # "x" is no label: wrong
    row = metrics.table_row("mine", {"LaMP-3": {"mae": 0.5, "rmse": 0.75}, "Toy-1": result})
    assert row.splitlines() == ["| method | L3 MAE | L3 RMSE | Toy acc | Toy F1 | Toy F1-macro |",
                                "|---|---|---|---|---|---|", "| mine | .500 | .750 | .500 | 1.000 | .500 |"]
    assert ("Toy-1", "accuracy", "Toy acc") in metrics.COLUMNS  # the view recipes/evaluate.py builds its table from


# --- a spec missing a piece fails when it is built ----------------------------------------------------------------

@pytest.mark.parametrize("field", REQUIRED)
def test_a_task_missing_a_field_fails_in_one_line_naming_task_and_field(field):
    fields = {k: v for k, v in TOY.items() if k != field}
    with pytest.raises(DataError) as err:
        TaskSpec(**fields)
    assert str(err.value).startswith(f"task 'Toy-1': field {field!r}: missing") and "\n" not in str(err.value)


@pytest.mark.parametrize("change, field", [
    (dict(kind="ranking"), "kind"),
    (dict(doc_fields=("body",)), "doc_fields"),
    (dict(labels=()), "labels"),
    (dict(kind="rating", labels=("1", "2", "3"), answer_rule="rating", positive_label=None,
          columns=(("mae", "MAE"),)), "labels"),
    (dict(positive_label="maybe"), "positive_label"),
    (dict(item_layout=(("post", "body", True),)), "item_layout"),
    (dict(answer_rule="text"), "answer_rule"),
    (dict(answer_rule="rating"), "answer_rule"),  # a label task normalises by citation or label, not as a rating
    (dict(kind="rating", labels=("1", "2", "3", "4", "5"), answer_rule="rating", positive_label="5",
          columns=(("mae", "MAE"),)), "positive_label"),  # f1_positive is a label-task metric
    (dict(columns=(("rouge1", "R-1"),)), "columns"),
    (dict(positive_label=None), "columns"),  # f1_positive needs a positive label
    (dict(folder=None, subfolder="new"), "subfolder"),
])
def test_an_inconsistent_field_fails_naming_task_and_field(change, field):
    with pytest.raises(DataError, match=rf"^task 'Toy-1': field '{field}': "):
        TaskSpec(**{**TOY, **change})


def test_a_task_whose_name_or_file_name_is_taken_is_refused(toy):
    with pytest.raises(DataError, match="already taken by task 'Toy-1'"):
        lamp.register_task(dataclasses.replace(toy, name="Toy-2", file_name="TOY-1"))
    with pytest.raises(DataError, match="already taken by task 'LaMP-3'"):
        lamp.register_task(dataclasses.replace(toy, name="LaMP_3", file_name="Toy_3"))


# --- no table drops a task silently --------------------------------------------------------------------------------

def test_a_task_with_no_columns_cannot_be_registered():
    with pytest.raises(DataError, match=r"^task 'Toy-1': field 'columns': expected a non-empty tuple"):
        TaskSpec(**{**TOY, "columns": ()})


def test_a_table_refuses_a_task_it_has_no_columns_for():
    with pytest.raises(DataError, match=r"no columns for task\(s\) 'LaMP-6'"):
        metrics.table_row("mine", {"LaMP-3": {"mae": 0.5, "rmse": 0.75}, "LaMP-6": {"accuracy": 1.0}})


def test_a_table_refuses_results_missing_a_column():
    with pytest.raises(DataError, match="no value for LaMP-3 rmse"):
        metrics.table_row("mine", {"LaMP-3": {"mae": 0.5}})


def test_every_registered_task_has_columns_of_metrics_that_evaluate_reports():
    assert [t for t in dict.fromkeys(t for t, _, _ in metrics.COLUMNS)] == list(lamp.TASKS)
    for name, spec in lamp.TASKS.items():
        gold = spec.labels[0] if spec.labels else "a short title"
        reported = metrics.evaluate(name, {"1": gold}, {"1": gold})
        assert set(reported) <= set(lamp.KINDS[spec.kind])
        assert {key for key, _ in spec.columns} <= set(reported), name
