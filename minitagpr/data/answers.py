"""Answers: what a reasoning model's response says, and the per-task label sets.

A Qwen3 thinking response reads `<think>` + chain + `</think>` + answer (+ `<|im_end|>`). The *answer* is what follows
the last `</think>`, stripped (lamp-format.md's rule). Before it is compared with a gold label it may be normalised
per task — a project choice, so `normalize(..., enabled=False)` returns the stripped answer untouched and numbers
under the official LaMP rules stay reproducible.

Normalisation rules (each returns a canonical label when the rule fires, otherwise the stripped answer unchanged,
which the official metrics then count as an invalid label / unparsable rating):

- LaMP-1: the answer names exactly one of the two references. A bracketed `[1]`/`[2]` (spaces inside allowed)
  decides when present; when no bracketed label appears, the numbers in the answer decide when every number in it is
  the same 1 or 2. So `2`, `[2].`, `reference [2]`, `Reference 2` -> `[2]`; `[1] or [2]` stays as it is.
- LaMP-2: compared ignoring case and every character that is not a letter or digit (quotes, spaces, hyphens,
  final punctuation), so `"Sci Fi"`, `sci-fi.`, `Thought Provoking` map to the tag; anything else stays.
- LaMP-3 and PGraphRAG-rating: after leading quotes/brackets/asterisks, a leading whole number 1-5 (`4`, `4.`,
  `4.0`, `4/5`, `**4** stars`, `4 out of 5`) -> `"4"`, provided no other number follows it except a `/5` or
  `out of 5` scale; `4.5`, `45`, `rating: 4`, `1e1`, `4-5`, `5/10`, `3 or 4` stay (the official rule parses them as
  floats or counts them unparsable).
- Generation tasks (LaMP-4, 5, 7, PGraphRAG-title): runs of whitespace become one space; nothing else (ROUGE's
  tokenizer ignores punctuation and case anyway).
"""
from __future__ import annotations

import re

TASKS = ("LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7", "PGraphRAG-title", "PGraphRAG-rating")
CLASSIFICATION_TASKS = frozenset({"LaMP-1", "LaMP-2", "LaMP-3", "PGraphRAG-rating"})

# The 15 LaMP-2 (movie tagging) tags in the order the benchmark's `input` lists them.
LAMP2_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)
RATINGS = ("1", "2", "3", "4", "5")

# Valid gold labels of every classification task (generation tasks have none).
LABELS: dict[str, list[str]] = {
    "LaMP-1": ["[1]", "[2]"],
    "LaMP-2": list(LAMP2_TAGS),
    "LaMP-3": list(RATINGS),
    "PGraphRAG-rating": list(RATINGS),
}

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
# LaMP-2 tags keyed by their letters and digits only: "thought-provoking" -> "thoughtprovoking".
_LAMP2_KEYS = {_NON_ALNUM_RE.sub("", tag): tag for tag in LAMP2_TAGS}


def canonical_task(task: str) -> str:
    """`"LaMP_2"` or `"LaMP-2"` -> `"LaMP-2"`; an unknown name is a ValueError listing the known ones."""
    name = task.replace("_", "-") if task.startswith("LaMP_") else task
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)} (or LaMP_k)")
    return name


def is_classification(task: str) -> bool:
    """True for the exact-match tasks (LaMP-1, LaMP-2, LaMP-3, PGraphRAG-rating), False for ROUGE tasks."""
    return canonical_task(task) in CLASSIFICATION_TASKS


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
    task = canonical_task(task)
    answer = answer.strip()
    if not enabled:
        return answer
    if task == "LaMP-1":
        return _normalize_citation(answer)
    if task == "LaMP-2":
        return _LAMP2_KEYS.get(_NON_ALNUM_RE.sub("", answer.lower()), answer)
    if task in ("LaMP-3", "PGraphRAG-rating"):
        return _normalize_rating(answer)
    return " ".join(answer.split())


def _normalize_citation(answer: str) -> str:
    if answer in ("[1]", "[2]"):
        return answer
    bracketed = set(_BRACKET_LABEL_RE.findall(answer))
    # Bracketed references decide when present; bare numbers only when there are none ("reference 2").
    numbers = bracketed if bracketed else set(_NUMBER_RE.findall(answer))
    if len(numbers) == 1:
        (number,) = numbers
        if number in ("1", "2"):
            return f"[{number}]"
    return answer


def _normalize_rating(answer: str) -> str:
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
    return value if value in RATINGS else answer
