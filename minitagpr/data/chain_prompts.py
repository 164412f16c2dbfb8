"""The prompts of the chain pipeline (Stage 0), in our own words: teacher, judge, exploratory and restricted tagging.

- teacher: the personalised request (the user's history items, then the benchmark's `input` verbatim) with an
  instruction to think it through and then answer in the task's exact form. No tags here: the teacher reasons
  freely; the tags are added afterwards by the tagger, as in the paper.
- judge: the same request, the teacher's reasoning and answer, and a rubric of four dimensions scored 1-5
  (`JUDGE_DIMENSIONS`); the reply is one JSON object with a short reason and a score per dimension and the total.
- exploratory tagging: cut the reasoning into consecutive segments, each doing one job, and wrap every segment in
  an XML-style tag whose name the tagger invents (snake_case); the text itself is copied unchanged.
- restricted tagging: the same, but only with the chosen tag set, each tag given with its definition.

Every function returns chat messages (`[{"role", "content"}]`) for an OpenAI-compatible endpoint.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from minitagpr.data.prompts import ANSWER_FORMS, render_profile

# The judge's four dimensions (tagpr-method.md, Stage 0 step 3): JSON key -> what a 5 means.
JUDGE_DIMENSIONS: dict[str, str] = {
    "logical_coherence": "every step follows from the ones before it; no jumps, no contradictions",
    "step_accuracy": "every statement about the request and the history items is true to what they say",
    "reasoning_completeness": "the reasoning covers what the answer depends on, including the evidence in the "
                              "user's history, without leaving the decisive step unstated",
    "relevance": "the reasoning stays on this request and this user; nothing is padding or off topic",
}
SCORE_MIN, SCORE_MAX = 1, 5


def _request_text(task: str, input_text: str, profile_items: Sequence[Mapping]) -> str:
    return f"{render_profile(task, profile_items)}\n\nRequest:\n{input_text}"


def teacher_messages(task: str, input_text: str, profile_items: Sequence[Mapping]) -> list[dict]:
    """The teacher's prompt: reason privately, then answer as this particular user would."""
    system = (
        "You answer requests on behalf of one particular user, and the right answer is the one this user would "
        "give. Some items from the user's own history come with each request. Think the problem through before "
        "you answer: make sure you understand what is being asked, go through the history items that bear on it, "
        "work out what they reveal about this user's preferences or way of writing, weigh the possible answers "
        "against that evidence, and check your choice.\n\n"
        f"Then give only the final answer: {ANSWER_FORMS[task]}. No explanation after it."
    )
    return [{"role": "system", "content": system},
            {"role": "user", "content": _request_text(task, input_text, profile_items)}]


def judge_messages(task: str, input_text: str, profile_items: Sequence[Mapping], chain: str,
                   answer: str) -> list[dict]:
    """The judge's prompt: grade one reasoning chain on the four dimensions; reply with JSON only."""
    rubric = "\n".join(f"- {name}: {meaning}" for name, meaning in JUDGE_DIMENSIONS.items())
    fields = ", ".join(f'"{name}": {{"reason": "...", "score": <{SCORE_MIN}-{SCORE_MAX}>}}'
                       for name in JUDGE_DIMENSIONS)
    system = (
        "You review the reasoning that a model wrote before answering a personalised request. You see the "
        "request (with items from the user's history), the reasoning and the final answer. Grade the reasoning, "
        f"not the answer alone, on four dimensions, each with a whole number from {SCORE_MIN} (poor) to "
        f"{SCORE_MAX} (excellent). A {SCORE_MAX} means:\n{rubric}\n\n"
        "Reply with a single JSON object and nothing else, in this shape:\n"
        f'{{{fields}, "total": <sum of the four scores>}}\n'
        "Keep each reason to one or two sentences."
    )
    user = (f"{_request_text(task, input_text, profile_items)}\n\n"
            f"Reasoning to grade:\n<<<\n{chain}\n>>>\n\nFinal answer given: {answer}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_COPY_RULES = (
    "Copy the reasoning word for word: do not add, drop, reorder or reword anything. Every part of it must sit "
    "inside exactly one segment, segments follow one another (no nesting), and each segment is written as "
    "<name> text </name> with the same name opening and closing it. Reply with the tagged reasoning only, "
    "without any comment before or after it."
)


def explore_messages(chain: str) -> list[dict]:
    """Exploratory tagging: segments named freely by the tagger (the names are clustered afterwards)."""
    system = (
        "You annotate reasoning written by a model. Split the reasoning you are given into consecutive segments "
        "so that each segment performs a single function in the argument. Give every segment a short name of "
        "your own, in lowercase snake_case, that says what the segment does (for example <some_function> ... "
        "</some_function>); reuse a name whenever two segments do the same kind of thing.\n\n" + _COPY_RULES
    )
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Reasoning to annotate:\n<<<\n{chain}\n>>>"}]


def restricted_messages(chain: str, tags: Mapping[str, str], min_tags: int) -> list[dict]:
    """Restricted tagging: segments named only with `tags` ({name: definition})."""
    tag_lines = "\n".join(f"- {name}: {meaning}" if meaning else f"- {name}" for name, meaning in tags.items())
    system = (
        "You annotate reasoning written by a model. Split the reasoning you are given into consecutive segments "
        "so that each segment performs a single function in the argument, and name every segment with the one "
        "tag below that fits it best. Use these tags and no others (a tag may be used more than once):\n"
        f"{tag_lines}\n\n"
        f"Use at least {min_tags} segments. " + _COPY_RULES
    )
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Reasoning to annotate:\n<<<\n{chain}\n>>>"}]
