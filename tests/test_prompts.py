"""Personalised prompts: instruction with the nine tags and the answer form, items per task, the token budget."""
import re

import pytest

from lamp_fixtures import LAMP_TASKS, make_examples
from minitagpr.data.lamp import TASKS, DataError, LampExample
from minitagpr.data.prompts import (
    ANSWER_FORMS, TAGS, PromptTooLongError, build_messages, fit_messages, instruction, render_item,
)
from minitagpr.data.retrieval import get_retriever


class WordCounter:
    """A stand-in tokenizer: one token per whitespace word plus 3 per message (role and markers)."""

    def __init__(self):
        self.calls = 0

    def apply_chat(self, messages, add_generation_prompt=False, enable_thinking=True):
        self.calls += 1
        n = sum(3 + len(m["content"].split()) for m in messages) + (2 if add_generation_prompt else 0)
        return list(range(n))


def _pgraphrag_example(task):
    profile = [{"id": "u_0", "title": "Soft and warm", "text": "Lovely towel, very soft.", "score": "5"},
               {"id": "u_1", "title": "Broke fast", "text": "The handle snapped in a week.", "score": "1"}]
    text = ("Write a title for this review. review: Works well." if task == "PGraphRAG-title"
            else "Rate this review from 1 to 5. title: Fine review: Works well.")
    return LampExample("u", task, text, profile, "u")


def _example(task):
    return _pgraphrag_example(task) if task.startswith("PGraphRAG") else make_examples(task, n=1, n_items=6)[0][0]


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_gets_system_instruction_then_profile_and_verbatim_query(task):
    ex = _example(task)
    msgs = build_messages(ex, ex.profile[:2])
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == instruction(task)
    assert msgs[1]["content"].endswith("Request:\n" + ex.input)
    assert "[1] " in msgs[1]["content"] and "[2] " in msgs[1]["content"] and "[3] " not in msgs[1]["content"]


@pytest.mark.parametrize("task", list(TASKS))
def test_instruction_lists_the_nine_tags_and_the_answer_form(task):
    text = instruction(task)
    listed = re.findall(r"^- (\w+): ", text, flags=re.MULTILINE)
    assert listed == list(TAGS) and len(TAGS) == 9
    assert "<think>" in text and "</think>" in text and ANSWER_FORMS[task] in text


def test_tags_agree_with_the_reward_module_when_present():
    rewards = pytest.importorskip("minitagpr.rewards")
    assert set(TAGS) == set(rewards.TAGS)


def test_lamp2_instruction_spells_every_tag():
    assert "exactly one of these tags" in instruction("LaMP-2") and "social commentary, violence, true story" \
        in instruction("LaMP-2")


@pytest.mark.parametrize("task,item,expected", [
    ("LaMP-1", {"id": "1", "title": "Graphs", "abstract": "long"}, "paper title: Graphs"),
    ("LaMP-2", {"id": "1", "description": "A robot.", "tag": "sci-fi"}, "movie: A robot.\n    tag: sci-fi"),
    ("LaMP-3", {"id": "1", "text": "Good.", "score": 4}, "review: Good.\n    score: 4"),
    ("LaMP-4", {"id": "1", "text": "Rain.", "title": "Storm"}, "article: Rain.\n    headline: Storm"),
    ("LaMP-5", {"id": "1", "abstract": "We study.", "title": "T"}, "abstract: We study.\n    title: T"),
    ("LaMP-7", {"id": "1", "text": "coffee!"}, "tweet: coffee!"),
    ("PGraphRAG-rating", {"id": "1", "title": "Ok", "text": "Fine.", "score": "3"},
     "title: Ok\n    review: Fine.\n    score: 3"),
])
def test_items_render_per_task(task, item, expected):
    assert render_item(task, item) == expected


def test_long_free_text_is_cut_but_titles_are_not():
    item = {"id": "1", "text": " ".join(["w"] * 300), "title": " ".join(["t"] * 300)}
    out = render_item("LaMP-4", item, max_item_words=10)
    assert out.startswith("article: " + " ".join(["w"] * 10) + " ...\n") and out.endswith(" ".join(["t"] * 300))
    assert render_item("LaMP-4", item, max_item_words=None).count("w") == 300


def test_no_profile_items_gives_a_profile_free_prompt():
    ex = _example("LaMP-3")
    assert "No history is available" in build_messages(ex, [])[1]["content"]


def test_items_keep_the_retrievers_order():
    ex = _example("LaMP-7")
    items = get_retriever("recency").select(ex, 3)
    user = build_messages(ex, items)[1]["content"]
    positions = [user.index(it["text"]) for it in items]
    assert positions == sorted(positions)


# --- the token budget ---------------------------------------------------------------------------------------------

def test_budget_drops_the_last_selected_items_first():
    ex = _example("LaMP-4")
    items = ex.profile
    tok = WordCounter()
    n_full = len(tok.apply_chat(build_messages(ex, items), add_generation_prompt=True))
    n_two = len(tok.apply_chat(build_messages(ex, items[:2]), add_generation_prompt=True))
    msgs, kept = fit_messages(ex, items, tok, max_prompt_tokens=n_two)
    assert kept == 2 and msgs == build_messages(ex, items[:2])
    assert fit_messages(ex, items, tok, max_prompt_tokens=n_two + 1)[1] == 2
    assert fit_messages(ex, items, tok, max_prompt_tokens=n_full)[1] == len(items)


def test_budget_counts_few_times():
    ex = make_examples("LaMP-7", n=1, n_items=32)[0][0]
    tok = WordCounter()
    n_bare = len(tok.apply_chat(build_messages(ex, []), add_generation_prompt=True))
    tok.calls = 0
    _, kept = fit_messages(ex, ex.profile, tok, max_prompt_tokens=n_bare + 100)
    assert 0 < kept < 32 and tok.calls <= 1 + 5  # the full prompt, then a binary search over 1..31


def test_budget_never_cuts_the_query():
    ex = _example("LaMP-5")
    tok = WordCounter()
    n_bare = len(tok.apply_chat(build_messages(ex, []), add_generation_prompt=True))
    msgs, kept = fit_messages(ex, ex.profile, tok, max_prompt_tokens=n_bare)
    assert kept == 0 and msgs[1]["content"].endswith(ex.input)
    with pytest.raises(PromptTooLongError, match=rf"example '100' \(LaMP-5\): the prompt is {n_bare} tokens "
                                                  rf"without any profile item, over max_prompt_tokens={n_bare - 1}"):
        build_messages(ex, ex.profile, tok, max_prompt_tokens=n_bare - 1)


def test_budget_without_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_messages(_example("LaMP-1"), [], max_prompt_tokens=100)


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_tokenizer_dir):
    tokenizer_mod = pytest.importorskip("minitagpr.tokenizer")
    return tokenizer_mod.Tokenizer.from_dir(qwen3_tokenizer_dir)


@pytest.mark.parametrize("task", LAMP_TASKS)
def test_budget_holds_with_the_real_qwen3_tokenizer(task, qwen3_tokenizer):
    tok = qwen3_tokenizer
    ex = make_examples(task, n=1, n_items=12)[0][0]
    count = lambda items: len(tok.apply_chat(build_messages(ex, items), add_generation_prompt=True))  # noqa: E731
    budget = (count([]) + count(ex.profile)) // 2
    msgs, kept = fit_messages(ex, ex.profile, tok, max_prompt_tokens=budget)
    assert 0 < kept < 12
    assert len(tok.apply_chat(msgs, add_generation_prompt=True, enable_thinking=True)) <= budget < count(
        ex.profile[:kept + 1])


def test_brief_style_names_every_tag_in_fewer_words_and_unknown_styles_fail():
    from minitagpr.data.prompts import TAGS, instruction
    full, brief = instruction("LaMP-3", "full"), instruction("LaMP-3", "brief")
    assert all(tag in brief for tag in TAGS) and "a single integer from 1 to 5" in brief
    assert len(brief.split()) * 3 < len(full.split())
    with pytest.raises(ValueError, match="prompt style must be one of full, brief"):
        instruction("LaMP-3", "terse")


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_a_budget_one_item_short_keeps_all_but_the_last_item():
    """The search must try len - 1 items (the largest n below the full set that failed)."""
    ex = _example("LaMP-4")
    items = ex.profile
    assert len(items) >= 3
    tok = WordCounter()
    n_all_but_one = len(tok.apply_chat(build_messages(ex, items[:-1]), add_generation_prompt=True))
    assert fit_messages(ex, items, tok, max_prompt_tokens=n_all_but_one)[1] == len(items) - 1


def test_a_field_exactly_at_the_word_limit_is_not_marked_as_cut():
    item = {"id": "1", "text": " ".join(["w"] * 10), "title": "t"}
    assert "..." not in render_item("LaMP-4", item, max_item_words=10)
    assert "..." in render_item("LaMP-4", {**item, "text": item["text"] + " w"}, max_item_words=10)


def test_the_style_of_rendered_messages_is_recognised_and_hand_written_ones_are_not():
    from minitagpr.data.prompts import STYLES, style_of
    ex = LampExample(id="1", task="LaMP-3", input="review: fine", profile=[])
    for style in STYLES:
        assert style_of("LaMP-3", build_messages(ex, [], style=style)) == style
    assert style_of("LaMP-3", [{"role": "user", "content": "hi"}]) is None
    assert style_of("LaMP-4", build_messages(ex, [], style="full")) is None  # another task's instruction


def test_an_exports_recorded_style_is_read_and_a_bad_record_is_named(tmp_path):
    from minitagpr.data.prompts import TRAINING_FILE, recorded_style
    assert recorded_style(tmp_path) is None  # a hub model or an older export: nothing recorded
    (tmp_path / TRAINING_FILE).write_text('{"prompt_style": "brief"}')
    assert recorded_style(tmp_path) == "brief"
    (tmp_path / TRAINING_FILE).write_text('{"prompt_style": "loud"}')
    with pytest.raises(DataError, match=r"minitagpr.json: field 'prompt_style': expected one of full, brief"):
        recorded_style(tmp_path)
    (tmp_path / TRAINING_FILE).write_text('[1')
    with pytest.raises(DataError, match=r"minitagpr.json: not a JSON object"):
        recorded_style(tmp_path)


# ---- pinned by mutation (2026-11-29) ---------------------------------------------------------------------------------

def test_a_training_file_holding_json_that_is_no_object_is_named(tmp_path):
    from minitagpr.data.prompts import TRAINING_FILE, recorded_style
    (tmp_path / TRAINING_FILE).write_text('["brief"]')  # valid JSON, but no object
    with pytest.raises(DataError, match=r"minitagpr.json: not a JSON object"):
        recorded_style(tmp_path)


def test_a_style_other_than_the_recorded_one_is_a_mismatch_naming_both(tmp_path):
    from minitagpr.data.prompts import TRAINING_FILE, style_mismatch
    assert style_mismatch(tmp_path, "full") is None  # nothing recorded: any style
    (tmp_path / TRAINING_FILE).write_text('{"prompt_style": "brief"}')
    assert style_mismatch(tmp_path, "brief") is None
    assert style_mismatch(tmp_path, "full", use="evaluated") == (
        f"trained with prompt_style=brief ({TRAINING_FILE}), evaluated with prompt_style=full; pass "
        f"prompt_style=brief")


def test_item_fields_are_shown_without_surrounding_whitespace():
    """A trailing newline in a field would break the one 'label: value' line per field layout."""
    item = {"id": "1", "text": "  The council met.\n", "title": "Council meets\n"}
    assert render_item("LaMP-4", item) == "article: The council met.\n    headline: Council meets"
