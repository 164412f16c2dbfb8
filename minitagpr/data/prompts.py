"""Personalised prompts: an instruction to reason with the nine tags, the user's k profile items, the query.

`build_messages(example, profile_items)` returns chat messages for the tokenizer's Qwen3 template:
- system: the instruction (our own wording) -- think inside `<think>` ... `</think>` as a sequence of tagged
  segments using only the nine tags of ../shared/docs/tagpr-method.md (each listed with a one-line meaning), then write
  only the answer after `</think>`, in the task's exact output form;
- user: the profile items, numbered in the order given (retrievers return most relevant first), rendered per
  task, followed by the example's `input` verbatim (it holds the query and the benchmark's own question).

Rendering choices: LaMP-1 items show the paper title only (abstracts would cost ~200 tokens each and the
benchmark's own prompts use titles); long free-text fields (article, abstract, description, review text) are cut
to `max_item_words` words (marked with "...") so that k = 32 items stay affordable; titles, tags and scores are
never cut. Pass `max_item_words=None` to keep every field whole.

Token budget: with `tokenizer` (anything with `apply_chat(messages, add_generation_prompt, enable_thinking)`) and
`max_prompt_tokens`, the prompt as the model sees it (generation prompt included, thinking on) must fit; profile
items are dropped from the end of the list (the least relevant, selected last) until it does. The query is never
cut: if the prompt without any profile item is still too long, `PromptTooLongError` says so.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from minitagpr.data.lamp import DataError, LampExample, TaskTable, canonical_task, task_spec

# The nine reasoning tags of TagPR (../shared/docs/tagpr-method.md), each with a one-line meaning in our words.
TAG_MEANINGS: dict[str, str] = {
    "analyze_input": "work out what the request asks for and what a good answer must look like",
    "examine_examples": "read the user's history items one at a time and note what each shows",
    "identify_patterns": "turn those observations into a rule about this user's tastes, habits or style",
    "evaluate_reference": "test the current input against one particular history item",
    "compare_entities": "put two or more items or candidate answers side by side",
    "synthesize_findings": "pull the evidence together before choosing",
    "make_decision": "commit to one answer",
    "verify_conclusion": "check that the chosen answer agrees with the evidence and the required format",
    "formulate_conclusion": "state the final answer in its required form",
}
TAGS = tuple(TAG_MEANINGS)

# Per task, in its TaskSpec (minitagpr.data.lamp.TASKS): what must follow </think>, how one profile item is shown
# ((label, field, cut to max_item_words?) in display order) and what the history is called. Live views of it:
ANSWER_FORMS = TaskTable(lambda spec: spec.answer_form)
ITEM_LAYOUT = TaskTable(lambda spec: spec.item_layout)
HISTORY_NAMES = TaskTable(lambda spec: spec.history_name)

DEFAULT_MAX_ITEM_WORDS = 150


class PromptTooLongError(DataError):
    """Even the prompt without profile items exceeds the token budget."""


STYLES = ("full", "brief")
TRAINING_FILE = "minitagpr.json"  # in an export: how it was trained (the prompt style later stages must use)


def instruction(task: str, style: str = "full") -> str:
    """The system message: how to reason (the nine tags) and how to answer (the task's `answer_form`).

    style "full" lists every tag with its meaning (what a general model needs to follow the format); "brief" names
    the tags only, in about a quarter of the tokens -- for models that learn the format in SFT, like the tiny demo
    model, whose every training and rollout token the instruction costs. Train and evaluate with the same style."""
    answer_form = task_spec(task).answer_form
    if style == "brief":
        return ("Answer as this user would; their history comes with the request. Reason inside <think> ... "
                "</think> in at least three tagged segments, using only these tags: " + ", ".join(TAG_MEANINGS)
                + f". After </think>, write only the answer: {answer_form}.")
    if style != "full":
        raise ValueError(f"prompt style must be one of {', '.join(STYLES)}, got {style!r}")
    tag_lines = "\n".join(f"- {tag}: {meaning}" for tag, meaning in TAG_MEANINGS.items())
    return (
        "You answer requests for one specific user, and the answer should be the one this user would give. "
        "Items from the user's own history come with the request; use them to infer the user's preferences "
        "and style.\n\n"
        "Reason first, inside <think> ... </think>. Write the reasoning as a sequence of segments, each wrapped "
        "in an opening and a closing tag such as <analyze_input> ... </analyze_input>. Use at least three "
        "segments and no tags other than these nine (any of them may be used more than once):\n"
        f"{tag_lines}\n\n"
        f"After </think>, write only the answer: {answer_form}. "
        "Add no explanation, no reasoning tags and nothing else."
    )


def _cut(text: str, max_words: int | None) -> str:
    if max_words is None:
        return text
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def render_item(task: str, item: Mapping[str, Any], max_item_words: int | None = DEFAULT_MAX_ITEM_WORDS) -> str:
    """One profile item as 'label: value' lines (the first line carries no number; see `render_profile`)."""
    if not isinstance(item, Mapping):
        raise DataError(f"profile item ({task}): expected an object, got {type(item).__name__}")
    lines = []
    for label, field, cut in task_spec(task).item_layout:
        if field not in item:
            raise DataError(f"profile item {item.get('id')!r} ({task}): field {field!r}: missing")
        value = str(item[field]).strip()
        lines.append(f"{label}: {_cut(value, max_item_words) if cut else value}")
    return "\n    ".join(lines)


def render_profile(task: str, items: Sequence[Mapping[str, Any]],
                   max_item_words: int | None = DEFAULT_MAX_ITEM_WORDS) -> str:
    if not items:
        return "No history is available for this user."
    body = "\n".join(f"[{i}] {render_item(task, item, max_item_words)}" for i, item in enumerate(items, start=1))
    return f"Some {task_spec(task).history_name} ({len(items)}, most relevant first):\n{body}"


def style_of(task: str, messages: Sequence[Mapping[str, Any]]) -> str | None:
    """The style whose instruction is `messages`' system message (SFT records carry rendered prompts), else None."""
    system = messages[0].get("content") if messages and messages[0].get("role") == "system" else None
    return next((style for style in STYLES if system == instruction(task, style)), None)


def recorded(checkpoint_dir, field: str) -> Any:
    """Field `field` of an export's TRAINING_FILE (how it was trained: SFT and RL exports record "prompt_style",
    PRMU exports "max_len"); None when the file or the field is absent."""
    import json
    from pathlib import Path

    path = Path(checkpoint_dir) / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(field)
    except (ValueError, AttributeError) as err:
        raise DataError(f"{path}: not a JSON object ({err})") from None


def recorded_style(checkpoint_dir) -> str | None:
    """The prompt style a minitagpr export was trained with (its TRAINING_FILE), None when it does not say (a hub
    model, an export from before the file, SFT data with mixed or hand-written prompts)."""
    from pathlib import Path

    path = Path(checkpoint_dir) / TRAINING_FILE
    style = recorded(checkpoint_dir, "prompt_style")
    if style is not None and style not in STYLES:
        raise DataError(f"{path}: field 'prompt_style': expected one of {', '.join(STYLES)}, got {style!r}")
    return style


def style_mismatch(checkpoint_dir, style: str, use: str = "prompted") -> str | None:
    """Why `style` must not prompt the export in `checkpoint_dir` (it was trained with another: it would read an
    instruction it never saw), as one clause for the caller's error; None when it matches or is not recorded."""
    trained = recorded_style(checkpoint_dir)
    if trained is None or trained == style:
        return None
    return f"trained with prompt_style={trained} ({TRAINING_FILE}), {use} with prompt_style={style}; pass " \
           f"prompt_style={trained}"


def _messages(task: str, example: LampExample, items: Sequence[Mapping[str, Any]],
              max_item_words: int | None, style: str = "full") -> list[dict]:
    user = f"{render_profile(task, items, max_item_words)}\n\nRequest:\n{example.input}"
    return [{"role": "system", "content": instruction(task, style)}, {"role": "user", "content": user}]


def _prompt_tokens(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat(messages, add_generation_prompt=True, enable_thinking=True))


def fit_messages(example: LampExample, profile_items: Sequence[Mapping[str, Any]], tokenizer=None,
                 max_prompt_tokens: int | None = None, *,
                 max_item_words: int | None = DEFAULT_MAX_ITEM_WORDS, style: str = "full") -> tuple[list[dict], int]:
    """`build_messages`, also returning how many of `profile_items` (a prefix) the prompt kept."""
    task = canonical_task(example.task)  # 'LaMP_k' works too
    instruction(task, style)  # rejects an unknown style before any tokenizer call
    if max_prompt_tokens is None:
        return _messages(task, example, profile_items, max_item_words, style), len(profile_items)
    if tokenizer is None:
        raise ValueError("max_prompt_tokens needs a tokenizer to count tokens with")
    full = _messages(task, example, profile_items, max_item_words, style)
    if _prompt_tokens(tokenizer, full) <= max_prompt_tokens:
        return full, len(profile_items)  # the common case: one tokenizer call
    # Largest n in [1, len - 1] whose prompt fits (n = len failed; lo = 0: none does). The prompt grows with n, so
    # binary search: about log2(k) tokenizer calls, each costing a full prompt's tokenisation.
    lo, hi = 0, len(profile_items) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = _messages(task, example, profile_items[:mid], max_item_words, style)
        if _prompt_tokens(tokenizer, trial) <= max_prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo:
        return _messages(task, example, profile_items[:lo], max_item_words, style), lo
    bare = _messages(task, example, [], max_item_words, style)
    n_bare = _prompt_tokens(tokenizer, bare)
    if n_bare > max_prompt_tokens:
        raise PromptTooLongError(
            f"example {example.id!r} ({task}): the prompt is {n_bare} tokens without any profile item, over "
            f"max_prompt_tokens={max_prompt_tokens}; the query is never cut, so raise the budget")
    return bare, 0


def build_messages(example: LampExample, profile_items: Sequence[Mapping[str, Any]], tokenizer=None,
                   max_prompt_tokens: int | None = None, *,
                   max_item_words: int | None = DEFAULT_MAX_ITEM_WORDS, style: str = "full") -> list[dict]:
    """Chat messages (system instruction + user turn) for `example` showing `profile_items`, within the budget."""
    return fit_messages(example, profile_items, tokenizer, max_prompt_tokens, max_item_words=max_item_words,
                        style=style)[0]
