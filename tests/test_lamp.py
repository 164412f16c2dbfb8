"""LaMP readers and writers: round trips for every task and split, and a clear error for each kind of bad input."""
import json

import pytest

from lamp_fixtures import LAMP_TASKS, make_examples
from minitagpr.data.lamp import (
    TASKS, DataError, LampExample, canonical_task, date_key, item_document, load_outputs, load_questions, query_text,
    split_files, write_outputs, write_questions,
)


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
    assert load_outputs(o_path) == (task, golds)
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
    rec = _valid_record(input="review: good", profile=[{"id": "1", "text": "ok", "score": 4, "date": 2011}])
    ex = load_questions(_write_raw(tmp_path / "q.json", [rec]), "LaMP-3")[0]
    assert ex.profile[0]["score"] == 4


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
    ([_valid_record()], "LaMP-4", r"field 'profile\[0\].title': missing \(every LaMP-4 profile item needs id, "
                                  r"text, title\)"),
    ({"id": "1"}, "LaMP-7", r"q.json: expected a JSON array of question records, got dict"),
    ([7], "LaMP-7", r"q.json: record 0: expected an object, got int"),
])
def test_malformed_questions_raise_a_message_naming_file_record_and_field(tmp_path, records, task, message):
    path = _write_raw(tmp_path / "q.json", records)
    with pytest.raises(DataError, match=message):
        load_questions(path, task)


def test_bad_json_names_the_file_and_position(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('[{"id": "1", "input": ')
    with pytest.raises(DataError, match=r"q.json: not valid JSON: .* line 1 column"):
        load_questions(path, "LaMP-7")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope.json: file not found"):
        load_questions(tmp_path / "nope.json", "LaMP-1")


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
])
def test_malformed_outputs_raise_a_message_naming_file_record_and_field(tmp_path, obj, message):
    with pytest.raises(DataError, match=message):
        load_outputs(_write_raw(tmp_path / "o.json", obj))
