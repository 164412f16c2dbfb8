"""Answer extraction and per-task normalisation (minitagpr.data.answers)."""
import pytest

from minitagpr.data.answers import (
    LABELS, TASKS, canonical_task, extract_answer, is_classification, normalize,
)
from minitagpr.data.lamp import LAMP2_TAGS


# --- extraction -------------------------------------------------------------------------------------------------
def test_answer_is_what_follows_the_last_think_close():
    assert extract_answer("<think>\nfirst</think> no </think>\n\n [2] \n") == "[2]"


def test_trailing_end_of_turn_markers_are_removed():
    assert extract_answer("<think>x</think>\ncomedy<|im_end|>\n<|endoftext|>") == "comedy"


def test_end_marker_inside_the_answer_is_kept():
    assert extract_answer("<think>x</think>a<|im_end|>b") == "a<|im_end|>b"


def test_response_without_think_markers_is_all_answer():
    assert extract_answer("  just 4 <|im_end|>") == "just 4"


def test_thinking_cut_off_by_the_length_limit_has_no_answer():
    # nothing follows a `</think>`: the unfinished chain is not scored as the answer (its words would earn ROUGE)
    assert extract_answer("<think>\nthe headline should mention the senate vote on the budget") == ""
    assert extract_answer("<think>reference [2] looks closer") == ""


# --- task names and label sets ----------------------------------------------------------------------------------
def test_underscore_task_names_are_accepted():
    assert canonical_task("LaMP_2") == "LaMP-2" and canonical_task("PGraphRAG-rating") == "PGraphRAG-rating"


def test_unknown_task_is_an_error_naming_it():
    with pytest.raises(ValueError, match="LaMP-6"):
        canonical_task("LaMP-6")


def test_classification_tasks_are_exactly_those_with_labels():
    assert {t for t in TASKS if is_classification(t)} == set(LABELS)


def test_lamp2_has_the_fifteen_tags_in_benchmark_order():
    assert len(LAMP2_TAGS) == 15 and LAMP2_TAGS[0] == "sci-fi" and LAMP2_TAGS[-1] == "true story"
    assert LABELS["LaMP-2"] == list(LAMP2_TAGS)


# --- LaMP-1 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["[2]", "2", "[2].", "reference [2]", "Reference 2", "[ 2 ]", "'[2]'"])
def test_lamp1_variants_of_one_reference_become_the_label(answer):
    assert normalize("LaMP-1", answer) == "[2]"


@pytest.mark.parametrize("answer", ["[1] or [2]", "3", "[3]", "both 1 and 2", "neither"])
def test_lamp1_ambiguous_or_foreign_answers_stay_unchanged(answer):
    assert normalize("LaMP-1", answer) == answer


def test_lamp1_brackets_win_over_bare_numbers():
    assert normalize("LaMP-1", "of the 2 papers, [1]") == "[1]"


# --- LaMP-2 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer,tag", [
    ("Sci-Fi", "sci-fi"), ("sci fi", "sci-fi"), ('"Dark Comedy".', "dark comedy"),
    ("Thought Provoking", "thought-provoking"), ("  based   on a book ", "based on a book"),
])
def test_lamp2_case_spacing_quotes_and_hyphens_map_to_a_tag(answer, tag):
    assert normalize("LaMP-2", answer) == tag


def test_lamp2_unknown_tag_stays_unchanged():
    assert normalize("LaMP-2", "horror movie ") == "horror movie"


# --- ratings ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["4", "4.", "4.0", "4/5", "**4** stars", '"4"', "04", "4 out of 5 stars",
                                    "4/5.", "4 out of 5."])
@pytest.mark.parametrize("task", ["LaMP-3", "PGraphRAG-rating"])
def test_rating_leading_integer_becomes_the_label(task, answer):
    assert normalize(task, answer) == "4"


@pytest.mark.parametrize("answer", ["4.5", "45", "0", "6", "rating: 4", "four", "1e1", "4-5", "5/10", "3 or 4",
                                    "4/5.5"])
def test_rating_without_a_leading_integer_1_to_5_stays_unchanged(answer):
    assert normalize("LaMP-3", answer) == answer


def test_rating_of_thousands_of_digits_is_not_an_error():
    digits = "9" * 10_000
    assert normalize("LaMP-3", digits) == digits


# --- generation and switching off -------------------------------------------------------------------------------
def test_generation_answers_only_collapse_whitespace():
    assert normalize("LaMP-4", "  A  Headline,\n\tHere! ") == "A Headline, Here!"


@pytest.mark.parametrize("task,answer", [("LaMP-1", " 2 "), ("LaMP-2", "Sci-Fi"), ("LaMP-3", "4.0"),
                                         ("LaMP-7", " a  b ")])
def test_disabled_normalisation_only_strips(task, answer):
    assert normalize(task, answer, enabled=False) == answer.strip()


def test_spaces_inside_a_label_bracket_are_allowed():  # pinned by mutation, 2026-11-27
    assert normalize("LaMP-1", "[ 2 ]") == "[2]"
    assert normalize("LaMP-1", "reference [ 2 ] (not 1)") == "[2]"


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -----------------------------------
@pytest.mark.parametrize("answer", ["7 stars", "07", "9.0", "**6**"])
def test_rating_leading_integer_outside_1_to_5_stays_unchanged(answer):
    """Only a leading whole number 1-5 becomes a label; "7 stars" must stay as it is (the official rule then counts
    it unparsable: the farther of 1 and 5), not be cut to "7" and scored as the number 7."""
    assert normalize("LaMP-3", answer) == answer
