"""Answers: what a reasoning model's response says, and how it is normalised to a task's label.

A Qwen3 thinking response reads `<think>` + chain + `</think>` + answer (+ `<|im_end|>`). The *answer* is what follows
the last `</think>`, stripped (lamp-format.md's rule). Before it is compared with a gold label it may be normalised
per task — a project choice, so `normalize(..., enabled=False)` returns the stripped answer untouched and numbers
under the official LaMP rules stay reproducible.

Each task names its normalisation rule (`answer_rule`) and its labels in its `TaskSpec` (minitagpr.data.lamp.TASKS);
`TASKS`, `CLASSIFICATION_TASKS` and `LABELS` here are live views of that registry. The rules (each returns a
canonical label when it fires, otherwise the stripped answer unchanged, which the official metrics then count as an
invalid label / unparsable rating):

- "citation" (LaMP-1): the answer names exactly one of the two references. A bracketed `[1]`/`[2]` (spaces inside
  allowed) decides when present; when no bracketed label appears, the numbers in the answer decide when every
  number in it is the same 1 or 2. So `2`, `[2].`, `reference [2]`, `Reference 2` -> `[2]`; `[1] or [2]` stays as it
  is. (In general: the one number n, when `[n]` is a label of the task.)
- "label" (LaMP-2): compared ignoring case and every character that is not a letter or digit (quotes, spaces,
  hyphens, final punctuation), so `"Sci Fi"`, `sci-fi.`, `Thought Provoking` map to the tag; anything else stays.
- "rating" (LaMP-3 and PGraphRAG-rating): after leading quotes/brackets/asterisks, a leading whole number 1-5 (`4`,
  `4.`, `4.0`, `4/5`, `**4** stars`, `4 out of 5`) -> `"4"`, provided no other number follows it except a `/5` or
  `out of 5` scale; `4.5`, `45`, `rating: 4`, `1e1`, `4-5`, `5/10`, `3 or 4` stay (the official rule parses them as
  floats or counts them unparsable).
- "text" (generation tasks: LaMP-4, 5, 7, PGraphRAG-title): runs of whitespace become one space; nothing else
  (ROUGE's tokenizer ignores punctuation and case anyway).
"""
from __future__ import annotations

import functools
import re

from minitagpr.data import lamp

TASKS = lamp.TaskList(lambda spec: [spec.name])  # every registered task name, in table order
# Valid gold labels of every classification task (generation tasks have none), and the names of those tasks.
LABELS = lamp.TaskTable(lambda spec: list(spec.labels), keep=lambda spec: spec.is_classification)
CLASSIFICATION_TASKS = LABELS.keys()  # set-like

END_MARKERS = ("<|im_end|>", "<|endoftext|>")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Every pattern here is linear: no nested quantifiers, and a failed match backtracks only over one run of digits
# or spaces that no other start position revisits.
_BRACKET_LABEL_RE = re.compile(r"\[\s*([0-9]+)\s*\]")
_NUMBER_RE = re.compile(r"[0-9]+")
_LEADING_NUMBER_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
# "4/5", "4 out of 5", "4/5.": the scale, not a rating; "4/5.5" is no scale
_SCALE_RE = re.compile(r"(?:/|\bout of)\s*5(?![0-9]|\.[0-9])", re.IGNORECASE)
_NON_ALNUM_RE = re.compile(r"[^0-9a-z]+")
_RATING_PREFIX_CHARS = "\"'`*[(<{ \t\n\r"


def canonical_task(task: str) -> str:
    """`"LaMP_2"` or `"LaMP-2"` -> `"LaMP-2"`: a registered task's name or file name, spelled exactly; an unknown
    name is a ValueError listing the known ones. Stricter than `lamp.canonical_task` (no other case or spacing)."""
    for spec in lamp.TASKS.values():
        if task in (spec.name, spec.file_name):
            return spec.name
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(lamp.TASKS)} (or LaMP_k)")


def is_classification(task: str) -> bool:
    """True for the exact-match tasks (LaMP-1, LaMP-2, LaMP-3, PGraphRAG-rating), False for ROUGE tasks."""
    return lamp.TASKS[canonical_task(task)].is_classification


def strip_end_markers(text: str) -> str:
    """`text` stripped of surrounding whitespace and of any trailing `<|im_end|>` / `<|endoftext|>` markers."""
    text = text.strip()
    while True:
        for marker in END_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                break
        else:
            return text


def extract_answer(text: str) -> str:
    """The answer of a response: what follows the last `</think>`, stripped (and end-of-turn markers removed).

    A response with no think markers at all (a model that does not reason) is all answer. A response that opens
    `<think>` and never closes it (thinking cut off by the length limit) has no answer: "" -- scoring the unfinished
    chain as if it were the answer would credit its words (ROUGE) or a label it mentions. Whether the layout was
    right is the format reward's business, not this function's.
    """
    cut = text.rfind(THINK_CLOSE)
    if cut < 0:
        return "" if THINK_OPEN in text else strip_end_markers(text)
    return strip_end_markers(text[cut + len(THINK_CLOSE):])


def normalize(task: str, answer: str, enabled: bool = True) -> str:
    """Map `answer` to the canonical label of `task` by the rules in this module's docstring.

    `enabled=False` returns `answer.strip()` — the official LaMP rules, with no leniency.
    """
    spec = lamp.TASKS[canonical_task(task)]
    answer = answer.strip()
    if not enabled:
        return answer
    if spec.answer_rule == "citation":
        return _normalize_citation(answer, spec.labels)
    if spec.answer_rule == "label":
        return _label_keys(spec.labels).get(_NON_ALNUM_RE.sub("", answer.lower()), answer)
    if spec.answer_rule == "rating":
        return _normalize_rating(answer, spec.labels)
    return " ".join(answer.split())


@functools.lru_cache(maxsize=None)
def _label_keys(labels: tuple[str, ...]) -> dict[str, str]:
    """Labels keyed by their lower-case letters and digits only: "thought-provoking" -> "thoughtprovoking"."""
    return {_NON_ALNUM_RE.sub("", label.lower()): label for label in labels}


def _normalize_citation(answer: str, labels: tuple[str, ...]) -> str:
    if answer in labels:
        return answer
    bracketed = set(_BRACKET_LABEL_RE.findall(answer))
    # Bracketed references decide when present; bare numbers only when there are none ("reference 2").
    numbers = bracketed if bracketed else set(_NUMBER_RE.findall(answer))
    if len(numbers) == 1:
        (number,) = numbers
        if f"[{number}]" in labels:  # LaMP-1: number is "1" or "2"
            return f"[{number}]"
    return answer


def _normalize_rating(answer: str, labels: tuple[str, ...]) -> str:
    body = answer.lstrip(_RATING_PREFIX_CHARS)
    match = _LEADING_NUMBER_RE.match(body)
    if match is None:
        return answer
    whole, fraction = match.group(1), match.group(2)
    if fraction is not None and fraction.strip("0"):
        return answer  # 4.5 is a real-valued rating, not an integer: leave it to the official float parse
    if _NUMBER_RE.search(_SCALE_RE.sub(" ", body[match.end():])):
        return answer  # another number after it (1e1, 4-5, 5/10, 3 or 4): not one rating
    value = whole.lstrip("0")  # compared as text: int() refuses numbers of thousands of digits
    return value if value in labels else answer
