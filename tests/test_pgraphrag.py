"""PGraphRAG tasks: hold out each multi-review user's last review; validation; the real files in ../shared."""
import json

import pytest

from minitagpr.data.lamp import DataError, load_questions, write_questions
from minitagpr.data.pgraphrag import FILES, PGRAPHRAG_TASKS, load_users, main, make_task
from minitagpr.data.prompts import build_messages
from minitagpr.data.retrieval import get_retriever
from minitagpr.metrics import evaluate


def _review(title, rating, text=None, pid="P1"):
    return {"rating": rating, "title": title, "text": text or f"{title} text", "pid": pid}


USERS = [
    {"id": "solo", "profile": [_review("Only one", 3)]},
    {"id": "ann", "profile": [_review("Soft towels", 5), _review("Broke fast", 1), _review("Decent mug", 4)]},
    {"id": "bob", "profile": [_review("Same again", 2), _review("Same again", 2)]},  # history = one review twice
]


def _write(tmp_path, users):
    path = tmp_path / "amazon_dev.json"
    path.write_text(json.dumps(users))
    return path


def test_title_task_holds_out_the_last_review_of_users_with_history(tmp_path):
    examples, golds = make_task(_write(tmp_path, USERS), "PGraphRAG-title")
    assert [e.id for e in examples] == ["ann"] and golds == {"ann": "Decent mug"}
    ex = examples[0]
    assert ex.user_id == "ann" and ex.input.endswith("review: Decent mug text")
    assert [it["title"] for it in ex.profile] == ["Soft towels", "Broke fast"]
    assert ex.profile[0] == {"id": "ann-0", "title": "Soft towels", "text": "Soft towels text", "score": "5",
                             "pid": "P1"}


def test_rating_task_gold_is_the_held_out_rating_and_input_shows_title_and_text(tmp_path):
    examples, golds = make_task(_write(tmp_path, USERS), "PGraphRAG-rating")
    assert golds == {"ann": "4"}
    assert "title: Decent mug review: Decent mug text" in examples[0].input


def test_verbatim_copies_of_the_held_out_review_leave_the_profile(tmp_path):
    path = _write(tmp_path, USERS)
    assert "bob" not in make_task(path, "PGraphRAG-title")[1]
    examples, golds = make_task(path, "PGraphRAG-title", drop_copies=False)
    assert golds["bob"] == "Same again" and examples[-1].profile[0]["title"] == "Same again"


def test_min_reviews_raises_the_bar(tmp_path):
    assert make_task(_write(tmp_path, USERS), "PGraphRAG-title", min_reviews=3)[1] == {"ann": "Decent mug"}
    assert make_task(_write(tmp_path, USERS), "PGraphRAG-title", min_reviews=4) == ([], {})


def test_min_reviews_below_two_is_refused(tmp_path):
    """One review is held out, so a profile needs a second one."""
    with pytest.raises(ValueError, match="min_reviews must be at least 2"):
        make_task(_write(tmp_path, USERS), "PGraphRAG-title", min_reviews=1)


def test_a_dated_review_keeps_its_date_in_the_profile_item(tmp_path):
    users = [{"id": "cy", "profile": [{**_review("Old kettle", 2), "date": "2019-03-04"}, _review("New kettle", 5)]}]
    examples, _ = make_task(_write(tmp_path, users), "PGraphRAG-rating")
    assert examples[0].profile == [{"id": "cy-0", "title": "Old kettle", "text": "Old kettle text", "score": "2",
                                    "pid": "P1", "date": "2019-03-04"}]


def test_tasks_round_trip_through_lamp_files(tmp_path):
    for task in PGRAPHRAG_TASKS:
        examples, _ = make_task(_write(tmp_path, USERS), task)
        write_questions(tmp_path / "q.json", examples)
        assert load_questions(tmp_path / "q.json", task) == examples


@pytest.mark.parametrize("users,message", [
    ({"id": "x"}, r"amazon_dev.json: expected a JSON array of users, got dict"),
    ([{"id": "a", "profile": [_review("t", 0)]}],
     r"record 0 \(id 'a'\): field 'profile\[0\].rating': expected an integer from 1 to 5, got 0"),
    ([{"id": "a", "profile": [_review("t", "5")]}], r"field 'profile\[0\].rating': expected an integer"),
    ([{"id": "a", "profile": [_review("t", 6)]}], r"field 'profile\[0\].rating': expected an integer from 1 to 5"),
    ([{"id": "a", "profile": [_review("t", True)]}], r"field 'profile\[0\].rating': expected an integer"),
    ([{"id": "a", "profile": [{"rating": 5, "text": "x", "pid": "p"}]}], r"field 'profile\[0\].title': missing"),
    ([{"id": "a", "profile": [_review("t", 5)]}, {"id": "a", "profile": [_review("t", 5)]}],
     r"record 1 \(id 'a'\): field 'id': duplicate id"),
    ([{"id": "a", "profile": []}], r"record 0 \(id 'a'\): field 'profile': empty profile"),
    ([{"profile": []}], r"record 0: field 'id': missing"),
    ([{"id": "a", "profile": [{**_review("t", 5), "text": "great \ud83d"}]}],
     r"record 0 \(id 'a'\): field 'profile\[0\].text': holds a lone UTF-16 surrogate"),
    ([{"id": "a\ud83d", "profile": [_review("t", 5)]}], r"field 'id': holds a lone UTF-16 surrogate"),
    ([], r"amazon_dev.json: no users \(an empty array\)"),
])
def test_malformed_user_files_name_file_record_and_field(tmp_path, users, message):
    with pytest.raises(DataError, match=message):
        load_users(_write(tmp_path, users))


def test_only_pgraphrag_tasks_can_be_built(tmp_path):
    with pytest.raises(DataError, match="LaMP-5 is not a PGraphRAG task"):
        make_task(_write(tmp_path, USERS), "LaMP_5")


# --- the real data in ../shared -----------------------------------------------------------------------------------

# Examples per file after dropping copies of the held-out review (users with 2+ reviews: 126, 119, 233, 228).
EXPECTED_SIZES = {"amazon_dev.json": 109, "amazon_test.json": 102, "hotel_dev.json": 204, "hotel_test.json": 205}


@pytest.mark.parametrize("name", FILES)
def test_real_pgraphrag_tasks_load_and_report_sizes(pgraphrag_dir, name):
    users = load_users(pgraphrag_dir / name)
    multi = sum(len(u["profile"]) >= 2 for u in users)
    for task in PGRAPHRAG_TASKS:
        examples, golds = make_task(users, task)
        sizes = [len(e.profile) for e in examples]
        print(f"{name} {task}: users={len(users)} multi-review={multi} examples={len(examples)} "
              f"profile items={sum(sizes)} (max {max(sizes)})")
        assert len(examples) == len(golds) == EXPECTED_SIZES[name]
        assert all(sizes) and set(golds) == {e.id for e in examples}
        if task == "PGraphRAG-rating":
            assert set(golds.values()) <= {"1", "2", "3", "4", "5"}


def test_real_pgraphrag_examples_retrieve_render_and_score(pgraphrag_dir):
    users = load_users(pgraphrag_dir / "amazon_dev.json")
    for task in PGRAPHRAG_TASKS:
        examples, golds = make_task(users, task)
        bm25 = get_retriever("bm25")
        for ex in examples[:20]:
            msgs = build_messages(ex, bm25.select(ex, 8))
            assert msgs[1]["content"].endswith(ex.input)
        perfect = evaluate(task, golds, golds)
        assert perfect in ({"rouge1": pytest.approx(1.0), "rougeL": pytest.approx(1.0)}, {"mae": 0.0, "rmse": 0.0})


def test_cli_prints_the_size_table(pgraphrag_dir, capsys):
    assert main([str(pgraphrag_dir)]) == 0
    out = capsys.readouterr().out
    assert "| amazon_dev.json | 2500 | 126 | PGraphRAG-title | 109 |" in out
