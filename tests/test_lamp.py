"""LaMP readers and writers: round trips for every task and split, and a clear error for each kind of bad input."""
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from lamp_fixtures import LAMP_TASKS, make_examples
from minitagpr.data.lamp import (
    TASKS, DataError, LampExample, canonical_task, date_key, item_document, load_outputs, load_questions, query_text,
    split_files, write_outputs, write_questions,
)
from minitagpr.data.retrieval import get_retriever


def _write_raw(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _valid_record(**changes):
    rec = {"id": "600", "input": "Paraphrase the following tweet: hello", "profile": [{"id": "6000", "text": "hi",
                                                                                       "date": "2014-01-02"}]}
    rec.update(changes)
    return rec


# --- round trips --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["user", "time"])
@pytest.mark.parametrize("task", LAMP_TASKS)
def test_questions_and_outputs_round_trip_for_every_task_and_split(tmp_path, task, split):
    examples, golds = make_examples(task, split=split)
    q_path, o_path = split_files(tmp_path, task, split=split, part="dev")
    write_questions(q_path, examples)
    write_outputs(o_path, task, golds)
    loaded = load_questions(q_path, task.replace("-", "_"))
    assert loaded == examples
    assert all(ex.task == task for ex in loaded)
    assert all((ex.user_id is not None) == (split == "time") for ex in loaded)
    assert load_outputs(o_path) == load_outputs(o_path, task.replace("-", "_")) == (task, golds)
    assert json.loads(o_path.read_text())["task"] == task.replace("-", "_")  # the benchmark spells it LaMP_k


def test_split_files_follow_the_download_layout(tmp_path):
    assert split_files(tmp_path, "LaMP_3", "user", "train") == (
        tmp_path / "LaMP_3/train/train_questions.json", tmp_path / "LaMP_3/train/train_outputs.json")
    assert split_files(tmp_path, "LaMP-2", "user", "dev")[0] == tmp_path / "LaMP_2/new/dev/dev_questions.json"
    assert split_files(tmp_path, "LaMP-7", "time", "dev")[1] == tmp_path / "time/LaMP_7/dev/dev_outputs.json"


def test_writers_leave_no_temporary_files(tmp_path):
    examples, golds = make_examples("LaMP-7")
    write_questions(tmp_path / "q.json", examples)
    write_outputs(tmp_path / "o.json", "LaMP-7", golds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json", "q.json"]


def test_reader_keeps_profile_lists_without_copying(tmp_path):
    examples, _ = make_examples("LaMP-4", n=1)
    write_questions(tmp_path / "q.json", examples)
    ex = load_questions(tmp_path / "q.json", "LaMP-4")[0]
    assert type(ex.profile) is list and ex.profile[0]["id"] == examples[0].profile[0]["id"]


def test_numeric_lamp3_scores_and_integer_years_are_accepted(tmp_path):
    rec = _valid_record(input="review: good", profile=[{"id": "1", "text": "ok", "score": 4, "date": 2011},
                                                       {"id": "2", "text": "ok", "score": "1"},
                                                       {"id": "3", "text": "ok", "score": 4.5}])
    ex = load_questions(_write_raw(tmp_path / "q.json", [rec]), "LaMP-3")[0]
    assert [item["score"] for item in ex.profile] == [4, "1", 4.5]


def test_a_null_date_loads_as_an_undated_item(tmp_path):
    # the recency retriever ranks a None date as undated, so the reader must let it through
    rec = _valid_record(profile=[{"id": "6000", "text": "hi", "date": None}, {"id": "6001", "text": "yo",
                                                                              "date": "2014-01-02"}])
    ex = load_questions(_write_raw(tmp_path / "q.json", [rec]), "LaMP-7")[0]
    assert ex.profile[0]["date"] is None
    assert get_retriever("recency").rank(ex) == [1, 0]


# --- task names and queries ---------------------------------------------------------------------------------------

def test_task_names_accept_underscore_and_dash():
    assert canonical_task("LaMP_2") == canonical_task("LaMP-2") == canonical_task("lamp-2") == "LaMP-2"
    assert canonical_task("PGraphRAG-title") == "PGraphRAG-title"
    with pytest.raises(DataError, match="unknown task 'LaMP_6'"):
        canonical_task("LaMP_6")


@pytest.mark.parametrize("task,text,query", [
    ("LaMP-1", 'For "my paper", which is related? Answer [1] or [2]. [1]: "alpha beta" [2]: "say "hi" now"',
     'alpha beta say "hi" now'),
    ("LaMP-2", "Which tag? tags: [sci-fi, comedy] description: a robot falls in love", "a robot falls in love"),
    ("LaMP-3", "What score from 1 to 5? review: great value", "great value"),
    ("LaMP-4", "Write a headline for the following article: storm hits city", "storm hits city"),
    ("LaMP-5", "Write a title for the following abstract of a paper: we study graphs", "we study graphs"),
    ("LaMP-7", "Paraphrase the tweet: off to work: coffee first", "off to work: coffee first"),
])
def test_query_is_the_per_task_query_item(task, text, query):
    assert query_text(LampExample("1", task, text, [{"id": "10"}])) == query


def test_missing_query_marker_is_an_error_naming_the_example():
    with pytest.raises(DataError, match=r"example '9' \(LaMP-3\): field 'input': no 'review:' marker"):
        query_text(LampExample("9", "LaMP-3", "rate this please", [{"id": "90"}]))


def test_bm25_documents_use_the_per_task_fields():
    item = {"id": "1", "title": "T", "text": "body", "abstract": "A", "description": "D"}
    assert item_document("LaMP-4", item) == "T body"
    assert item_document("LaMP-1", item) == "T A"
    assert item_document("LaMP-2", item) == "D"
    assert TASKS["LaMP-7"].doc_fields == ("text",)


def test_bm25_document_of_an_item_missing_a_field_names_item_and_field():
    with pytest.raises(DataError, match=r"profile item '7' \(LaMP-4\): field 'text': missing"):
        item_document("LaMP_4", {"id": "7", "title": "T"})


def test_dates_compare_as_integer_tuples():
    assert date_key("2012-06-01") == (2012, 6, 1) and date_key(2011) == (2011,)
    assert date_key("2012-06-01T10:20:30") == (2012, 6, 1, 10, 20, 30)
    assert date_key("June 2012") is None and date_key(True) is None


# --- malformed questions files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("records,task,message", [
    ([_valid_record(), _valid_record(input=None)], "LaMP-7",
     r"q.json: record 1 \(id '600'\): field 'input': expected str, got NoneType"),
    ([{"input": "x: y", "profile": []}], "LaMP-7", r"q.json: record 0: field 'id': missing"),
    ([_valid_record(id=600)], "LaMP-7", r"q.json: record 0 \(id 600\): field 'id': expected str, got int"),
    ([_valid_record(profile={"id": "1"})], "LaMP-7", r"record 0 \(id '600'\): field 'profile': expected list"),
    ([_valid_record(profile=[])], "LaMP-7", r"record 0 \(id '600'\): field 'profile': empty profile"),
    ([_valid_record(), _valid_record()], "LaMP-7",
     r"q.json: record 1 \(id '600'\): field 'id': duplicate id \(first at record 0\)"),
    ([_valid_record(profile=[{"id": "1", "date": "2014-01-02"}])], "LaMP-7",
     r"record 0 \(id '600'\): field 'profile\[0\].text': missing"),
    ([_valid_record(profile=[{"id": "1", "text": 5}])], "LaMP-7",
     r"field 'profile\[0\].text': expected a string, got int"),
    ([_valid_record(profile=[{"id": "1", "text": "x", "date": "someday"}])], "LaMP-7",
     r"field 'profile\[0\].date': cannot read date 'someday'"),
    ([_valid_record(profile=["text"])], "LaMP-7", r"field 'profile\[0\]': expected an object, got str"),
    ([_valid_record(user_id=[1])], "LaMP-7", r"field 'user_id': expected a string, got list"),
    ([_valid_record(input="article: x")], "LaMP-4",
     r"field 'profile\[0\].title': missing \(every LaMP-4 profile item needs id, text, title\)"),
    ([_valid_record(input="rate this please")], "LaMP-3",
     r"q.json: record 0 \(id '600'\): field 'input': no 'review:' marker before the query"),
    ([_valid_record(input="")], "LaMP-1",
     r"q.json: record 0 \(id '600'\): field 'input': expected '\[1\]: \"<title>\" \[2\]: \"<title>\"'"),
    ([_valid_record(profile=[{"id": "1", "text": "x", "date": "2014-01"}, {"id": "2", "text": "x", "date": None},
                             {"id": "3", "text": "x", "date": "someday"}])], "LaMP-7",
     r"field 'profile\[2\].date': cannot read date 'someday'"),
    # "\ud83d" without its other half: no UTF-8 write or tokenizer call could take it later
    ([_valid_record(input="x: a \ud83d b")], "LaMP-7",
     r"record 0 \(id '600'\): field 'input': holds a lone UTF-16 surrogate \\ud83d at character 5"),
    ([_valid_record(profile=[{"id": "1", "text": "ok \udc00"}])], "LaMP-7",
     r"field 'profile\[0\].text': holds a lone UTF-16 surrogate \\udc00"),
    ([_valid_record(id="1\ud800")], "LaMP-7", r"field 'id': holds a lone UTF-16 surrogate \\ud800"),
    ([_valid_record(user_id="u\ud83d")], "LaMP-7", r"field 'user_id': holds a lone UTF-16 surrogate"),
    # pinned 2026-11-29: both were a bare OverflowError
    ([_valid_record(profile=[{"id": "1", "text": "x", "date": "2012-01-01 inf"}])], "LaMP-7",
     r"q.json: record 0 \(id '600'\): field 'profile\[0\].date': cannot read date"),
    ([_valid_record(input="review: fine", profile=[{"id": "1", "text": "x", "score": 10 ** 400}])], "LaMP-3",
     r"q.json: record 0 \(id '600'\): field 'profile\[0\].score': expected a rating from 1 to 5"),
    ({"id": "1"}, "LaMP-7", r"q.json: expected a JSON array of question records, got dict"),
    ([7], "LaMP-7", r"q.json: record 0: expected an object, got int"),
    ([], "LaMP-7", r"q.json: no question records \(an empty array\)"),
])
def test_malformed_questions_raise_a_message_naming_file_record_and_field(tmp_path, records, task, message):
    path = _write_raw(tmp_path / "q.json", records)
    with pytest.raises(DataError, match=message):
        load_questions(path, task)


@pytest.mark.parametrize("score", ["seven", "", math.nan, math.inf, 0, 6, "5.5"])
def test_a_lamp3_score_that_is_no_rating_from_1_to_5_names_the_item(tmp_path, score):
    rec = _valid_record(input="review: good", profile=[{"id": "1", "text": "ok", "score": "4"},
                                                       {"id": "2", "text": "ok", "score": score}])
    with pytest.raises(DataError, match=r"q.json: record 0 \(id '600'\): field 'profile\[1\].score': "
                                        r"expected a rating from 1 to 5, got " + re.escape(repr(score))):
        load_questions(_write_raw(tmp_path / "q.json", [rec]), "LaMP-3")


def test_bad_json_names_the_file_and_position(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('[{"id": "1", "input": ')
    with pytest.raises(DataError, match=r"q.json: not valid JSON: .*\(line 1 column \d+\)"):
        load_questions(path, "LaMP-7")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope.json: file not found"):
        load_questions(tmp_path / "nope.json", "LaMP-1")


def test_a_folder_given_as_a_file_is_a_data_error_naming_it(tmp_path):
    folder = tmp_path / "LaMP_3"
    folder.mkdir()
    with pytest.raises(DataError, match=r"LaMP_3: cannot read the file: Is a directory"):
        load_questions(folder, "LaMP-3")
    with pytest.raises(DataError, match=r"LaMP_3: cannot read the file: Is a directory"):
        load_outputs(folder)


# --- malformed outputs files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("obj,message", [
    ([], r"o.json: expected an object \{'task', 'golds'\}, got list"),
    ({"golds": []}, r"o.json: field 'task': missing"),
    ({"task": "LaMP_9", "golds": []}, r"o.json: field 'task': unknown task 'LaMP_9'"),
    ({"task": "LaMP_1", "golds": {}}, r"o.json: field 'golds': expected list, got dict"),
    ({"task": "LaMP_1", "golds": [{"id": "1"}]}, r"o.json: record 0 \(id '1'\): field 'golds.output': missing"),
    ({"task": "LaMP_1", "golds": [{"id": "1", "output": 1}]},
     r"record 0 \(id '1'\): field 'golds.output': expected str, got int"),
    ({"task": "LaMP_1", "golds": [{"id": "1", "output": "[1]"}, {"id": "1", "output": "[2]"}]},
     r"o.json: record 1 \(id '1'\): field 'golds.id': duplicate id"),
    ({"task": "LaMP_7", "golds": [{"id": "1", "output": "\ud83d"}]},
     r"record 0 \(id '1'\): field 'golds.output': holds a lone UTF-16 surrogate"),
    ({"task": "LaMP_7", "golds": [{"id": "1\ud800", "output": "x"}]},
     r"field 'golds.id': holds a lone UTF-16 surrogate"),
    ({"task": "LaMP_7", "golds": [], "minitagpr": ["normalize"]}, r"o.json: field 'minitagpr': expected an object, "
                                                                   r"got list"),
])
def test_malformed_outputs_raise_a_message_naming_file_record_and_field(tmp_path, obj, message):
    with pytest.raises(DataError, match=message):
        load_outputs(_write_raw(tmp_path / "o.json", obj))


# --- gold files: the task they hold and the answers they give ------------------------------------------------------

def test_a_gold_file_of_another_task_is_refused_naming_both_tasks(tmp_path):
    path = _write_raw(tmp_path / "o.json", {"task": "LaMP_2", "golds": [{"id": "1", "output": "comedy"}]})
    assert load_outputs(path) == ("LaMP-2", {"1": "comedy"})  # without an expected task any task is read
    with pytest.raises(DataError, match=r"o.json: field 'task': the file holds 'LaMP_2' \(LaMP-2\), expected LaMP-1"):
        load_outputs(path, "LaMP-1")


@pytest.mark.parametrize("task,gold,message", [
    ("LaMP-1", "1", r"'1' is not a LaMP-1 label \(expected one of '\[1\]', '\[2\]'\)"),
    ("LaMP-1", " [ 1]", r"' \[ 1\]' is not a LaMP-1 label"),
    ("LaMP-2", "horror", r"'horror' is not a LaMP-2 label \(expected one of 'sci-fi', 'based on a book'"),
    ("LaMP-3", "three", r"expected a rating from 1 to 5, got 'three'"),
    ("LaMP-3", "nan", r"expected a rating from 1 to 5, got 'nan'"),
    ("LaMP-3", "", r"expected a rating from 1 to 5, got ''"),
])
def test_a_gold_that_is_no_answer_of_its_task_names_file_record_and_field(tmp_path, task, gold, message):
    _, golds = make_examples(task, n=2)
    golds["101"] = gold
    path = write_outputs(tmp_path / "o.json", task, golds)
    assert load_outputs(path)[1]["101"] == gold  # predictions are read as they are: an invalid one is scored wrong
    with pytest.raises(DataError, match=r"o.json: record 1 \(id '101'\): field 'golds.output': " + message):
        load_outputs(path, task)


def test_generation_golds_numeric_rating_golds_and_padded_labels_are_accepted(tmp_path):
    golds = {"1": "4", "2": "4.0", "3": " 1"}  # the official scoring reads rating golds with float()
    assert load_outputs(write_outputs(tmp_path / "o3.json", "LaMP-3", golds), "LaMP-3")[1] == golds
    golds = {"1": "[1]\n", "2": " [2]"}  # and a label gold with white space around it (stripped by the official
    assert load_outputs(write_outputs(tmp_path / "o1.json", "LaMP-1", golds), "LaMP-1")[1] == golds  # scoring too)
    golds = {"1": "", "2": "a headline"}
    assert load_outputs(write_outputs(tmp_path / "o4.json", "LaMP-4", golds), "LaMP-4")[1] == golds


@pytest.fixture
def evaluate_recipe(monkeypatch):
    """recipes/evaluate.py as a module (recipes/ is not a package)."""
    spec = importlib.util.spec_from_file_location("recipe_evaluate_in_test_lamp",
                                                  Path(__file__).parents[1] / "recipes" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("golds_task,bad_gold,message", [
    ("LaMP-2", None, r"field 'task': the file holds 'LaMP_2' \(LaMP-2\), expected LaMP-1"),
    ("LaMP-1", "1", r"record 0 \(id '100'\): field 'golds.output': '1' is not a LaMP-1 label"),
])
def test_rl_prompts_and_the_evaluation_refuse_golds_that_are_no_answer(tmp_path, evaluate_recipe, golds_task,
                                                                       bad_gold, message):
    # the two places that read golds as targets: RL prompts (rewards) and the evaluation table (scores)
    from minitagpr.rl.loop import RLConfig, load_prompts

    examples, _ = make_examples("LaMP-1", n=2)
    q_path, o_path = split_files(tmp_path, "LaMP-1", "user", "train")
    write_questions(q_path, examples)
    _, golds = make_examples(golds_task, n=2)
    if bad_gold is not None:
        golds["100"] = bad_gold
    write_outputs(o_path, golds_task, golds)
    with pytest.raises(DataError, match=r"train_outputs.json: " + message):
        load_prompts(RLConfig(data_root=str(tmp_path), tasks="LaMP-1:0", part="train"), tokenizer=None)
    with pytest.raises(DataError, match=r"train_outputs.json: " + message):
        evaluate_recipe.load_task_data(tmp_path, "LaMP-1", part="train")


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_a_numeric_user_id_is_read_as_a_string(tmp_path):
    """User ids key PRMU's table as strings: an int 42 missed the row of "42" and scored as the unknown user."""
    examples, _ = make_examples("LaMP-7", n=1)
    path = tmp_path / "q.json"
    write_questions(path, examples)
    records = json.loads(path.read_text())
    records[0]["user_id"] = 42
    path.write_text(json.dumps(records))
    assert load_questions(path, "LaMP-7")[0].user_id == "42"


def test_lamp2_folders_for_both_download_layouts(tmp_path):
    """User split: always LaMP_2/new/; time split: new/ when it exists, else the plain folder."""
    (tmp_path / "LaMP_2/dev").mkdir(parents=True)  # the old LaMP-2 beside no new/: still new/ for the user split
    assert split_files(tmp_path, "LaMP-2", "user", "dev")[0] == tmp_path / "LaMP_2/new/dev/dev_questions.json"
    (tmp_path / "time/LaMP_2/dev").mkdir(parents=True)
    assert split_files(tmp_path, "LaMP-2", "time", "dev")[0] == tmp_path / "time/LaMP_2/dev/dev_questions.json"
    (tmp_path / "time/LaMP_2/new/dev").mkdir(parents=True)
    assert split_files(tmp_path, "LaMP-2", "time", "dev")[0] == tmp_path / "time/LaMP_2/new/dev/dev_questions.json"


# ---- pinned by mutation (2026-11-29) ---------------------------------------------------------------------------------

def test_a_single_gold_with_no_question_is_refused():
    """The ids must match one to one: one extra gold is as wrong as ten."""
    from minitagpr.data.lamp import check_no_extra_golds
    examples, golds = make_examples("LaMP-3", n=2)
    check_no_extra_golds(golds, examples, "o.json")  # one to one: fine
    with pytest.raises(DataError, match=r"o.json: gold output\(s\) for id\(s\) with no question: '999'"):
        check_no_extra_golds({**golds, "999": "3"}, examples, "o.json")


def test_user_split_records_are_written_without_a_user_id_key(tmp_path):
    examples, _ = make_examples("LaMP-7", n=2, split="user")
    records = json.loads(write_questions(tmp_path / "q.json", examples).read_text())
    assert all(set(rec) == {"id", "input", "profile"} for rec in records)
    examples, _ = make_examples("LaMP-7", n=2, split="time")
    records = json.loads(write_questions(tmp_path / "q.json", examples).read_text())
    assert [rec["user_id"] for rec in records] == ["u0", "u1"]


def test_an_examples_user_is_its_user_id_and_else_its_question_id():
    assert LampExample("600", "LaMP-7", "x: y", [], user_id="u7").user == "u7"
    assert LampExample("600", "LaMP-7", "x: y", []).user == "600"  # user split: one user per question


def test_lamp2_labels_are_the_15_tags_in_the_benchmarks_order():
    """lamp-format.md lists the tags in the fixed order LaMP-2 inputs use."""
    assert TASKS["LaMP-2"].labels == (
        "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
        "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story")


def test_label_and_rating_tasks_are_classification_and_generation_tasks_are_not():
    assert {name for name, spec in TASKS.items() if spec.is_classification} == {
        "LaMP-1", "LaMP-2", "LaMP-3", "PGraphRAG-rating"}
