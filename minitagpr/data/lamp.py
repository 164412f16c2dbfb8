"""LaMP files: the example type, per-task metadata, validating readers and atomic writers.

A LaMP download holds, per task and split, a questions file (a JSON array of `{"id", "input", "profile"}` records,
time-split records may add `"user_id"`) and an outputs file (`{"task": "LaMP_k", "golds": [{"id", "output"}]}`);
prediction files share the outputs shape. See ../shared/docs/lamp-format.md.

The facts about a task live in one registry, `TASKS`: one `TaskSpec` per task -- kind and labels, profile-item
fields, BM25 document fields, where the query sits in the `input`, where a download keeps the files, how prompts
show an item and what answer they ask for (`prompts`), how a free answer is normalised (`answers`) and the table
columns (`metrics`). Those modules read the spec; their older per-task tables (`prompts.ANSWER_FORMS`,
`ITEM_LAYOUT`, `HISTORY_NAMES`, `answers.TASKS`, `LABELS`, `CLASSIFICATION_TASKS`, `metrics.COLUMNS`) are live
views of it. The two PGraphRAG tasks (built by `minitagpr.data.pgraphrag`) are here too, so retrievers and prompts
treat all eight alike. Not here: data generation (the demo world and the PGraphRAG builder make inputs and golds
for their own tasks) and which tasks a recipe runs by default.

Adding a task: add a `TaskSpec` to the list registered below (or call `register_task` before the task is used).
Every task sets name, file_name, kind, item_fields, doc_fields, query_marker, item_layout, history_name,
answer_form, answer_rule and columns. Kind is "label" (set `labels`; accuracy, F1; a `positive_label` adds
f1_positive), "rating" (labels = `RATINGS`; MAE, RMSE) or "generation" (no labels, answer_rule "text"; ROUGE-1/L);
`columns` pick their metrics from `KINDS[kind]`. A field left unset or inconsistent raises when the TaskSpec is
built (at import), in one line naming the task and the field. Data files: with `folder` set, under a data root as
`<folder>/<part>/<part>_questions.json` and `<part>_outputs.json` (part = train, dev or test; the time split under
`time/`; see `split_files`), the outputs' "task" spelled as `file_name`; without `folder`, read them with
`load_questions` / `load_outputs`.

Validation is strict and early: a bad record raises `DataError` naming the file, the record (index and id) and the
field, never a deep stack trace and never a silent skip. Readers keep the parsed profile lists as they are (no
copies): train profiles run to hundreds of MB.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitagpr.atomic import atomic_write_json


class DataError(ValueError):
    """Bad input data. The message says where: file, record index and id, field."""


def where(source: Any, index: int | None = None, record_id: Any = None, field: str | None = None) -> str:
    """'file.json: record 3 (id '600'): field 'profile[2].date'' -- the prefix of every DataError message."""
    parts = [str(source)]
    if index is not None:
        parts.append(f"record {index}" + (f" (id {record_id!r})" if record_id is not None else ""))
    if field is not None:
        parts.append(f"field {field!r}")
    return ": ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Task metadata: the one registry

LAMP2_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)  # the fixed order in which LaMP-2 inputs list the 15 movie tags
RATINGS = ("1", "2", "3", "4", "5")  # the labels of every "rating" task: metrics and gold checks assume a 1-5 scale

# The kinds of task, each with the metrics `minitagpr.metrics.evaluate` reports for it (f1_positive: only for a
# task with a `positive_label`). A new kind needs code in metrics.evaluate and answers.normalize, not just a name.
KINDS = {"label": ("accuracy", "f1_macro", "f1_positive"), "rating": ("mae", "rmse"),
         "generation": ("rouge1", "rougeL")}
# How `minitagpr.data.answers.normalize` maps a free answer to a label (its docstring gives each rule).
ANSWER_RULES = {"label": ("citation", "label"), "rating": ("rating",), "generation": ("text",)}  # by kind


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()  # the default of the fields every task must set (None is a real query_marker, so not None)


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    name: str = UNSET                # canonical name, e.g. "LaMP-3"
    file_name: str = UNSET           # how outputs files spell it, e.g. "LaMP_3" (also accepted by canonical_task)
    kind: str = UNSET                # a key of KINDS: "label" (fixed label set), "rating" (1-5) or "generation"
    labels: tuple[str, ...] = ()     # the answer set of "label" and "rating" tasks, as strings; none for generation
    positive_label: str | None = None  # the label whose F1 metrics reports as f1_positive (LaMP-1: "[1]")
    # data files: profile items, retrieval, where a download keeps them
    item_fields: tuple[str, ...] = UNSET  # fields every profile item must carry besides "id"
    doc_fields: tuple[str, ...] = UNSET   # joined with a space into the item's BM25 document
    query_marker: str | None = UNSET      # the query is the input after this marker; None: LaMP-1's two titles
    folder: str | None = None        # its folder in a LaMP-layout download (see split_files); None: not in one
    subfolder: str = ""              # LaMP-2: "new", the movie-tagging version inside `folder`
    # prompts (minitagpr.data.prompts)
    item_layout: tuple[tuple[str, str, bool], ...] = UNSET  # how an item is shown: (label, field, cut?) in order
    history_name: str = UNSET        # "Some <history_name> (k, most relevant first):"
    answer_form: str = UNSET         # what the instruction says must follow </think>
    # answers and metrics
    answer_rule: str = UNSET         # one of ANSWER_RULES[kind] ("text" for generation tasks)
    columns: tuple[tuple[str, str], ...] = UNSET  # (metric key, header) of its table columns, in table order

    def __post_init__(self) -> None:
        problem = _spec_problem(self)
        if problem is not None:
            raise DataError(f"task {self.name!r}: field {problem[0]!r}: {problem[1]}")

    @property
    def is_classification(self) -> bool:
        """Classification in the sense of docs/interfaces.md (exact-match reward): label and rating tasks."""
        return self.kind in ("label", "rating")


def _strings(value: Any) -> bool:
    return isinstance(value, tuple) and bool(value) and all(isinstance(v, str) and v for v in value)


def _spec_problem(s: TaskSpec) -> tuple[str, str] | None:
    """(field, what is wrong) for the first field of `s` that is unset or inconsistent; None when all are fine."""
    for name in ("name", "file_name", "kind", "item_fields", "doc_fields", "query_marker", "item_layout",
                 "history_name", "answer_form", "answer_rule", "columns"):
        if getattr(s, name) is UNSET:
            return name, "missing (every task sets it; see 'Adding a task' in minitagpr/data/lamp.py)"
    for name in ("name", "file_name", "history_name", "answer_form"):
        if not isinstance(getattr(s, name), str) or not getattr(s, name):
            return name, f"expected a non-empty string, got {getattr(s, name)!r}"
    if s.kind not in KINDS:
        return "kind", f"expected one of {', '.join(KINDS)}, got {s.kind!r}"
    if not _strings(s.item_fields):
        return "item_fields", f"expected a non-empty tuple of field names, got {s.item_fields!r}"
    if not _strings(s.doc_fields) or not set(s.doc_fields) <= set(s.item_fields):
        return "doc_fields", f"expected a non-empty tuple of item_fields, got {s.doc_fields!r}"
    if s.query_marker is not None and (not isinstance(s.query_marker, str) or not s.query_marker):
        return "query_marker", f"expected a non-empty string or None, got {s.query_marker!r}"
    if s.kind == "generation" and s.labels != ():
        return "labels", f"a generation task has no labels, got {s.labels!r}"
    if s.kind != "generation" and (not _strings(s.labels) or len(set(s.labels)) != len(s.labels)):
        return "labels", f"a {s.kind} task needs a tuple of distinct label strings, got {s.labels!r}"
    if s.kind == "rating" and s.labels != RATINGS:
        return "labels", f"a rating task's labels are {RATINGS} (metrics assume a 1-5 scale), got {s.labels!r}"
    if s.positive_label is not None and (s.kind != "label" or s.positive_label not in s.labels):
        return "positive_label", f"{s.positive_label!r} is not one of the labels of a label task"
    if s.folder is not None and (not isinstance(s.folder, str) or not s.folder):
        return "folder", f"expected a folder name or None, got {s.folder!r}"
    if not isinstance(s.subfolder, str) or (s.subfolder and s.folder is None):
        return "subfolder", f"expected a folder name inside `folder` (or \"\"), got {s.subfolder!r}"
    if not isinstance(s.item_layout, tuple) or not s.item_layout or not all(
            isinstance(row, tuple) and len(row) == 3 and isinstance(row[0], str) and row[1] in s.item_fields
            and isinstance(row[2], bool) for row in s.item_layout):
        return "item_layout", f"expected a non-empty tuple of (label, one of item_fields, cut?), got {s.item_layout!r}"
    if s.answer_rule not in ANSWER_RULES[s.kind]:
        return "answer_rule", (f"a {s.kind} task's rule is one of {', '.join(ANSWER_RULES[s.kind])}, "
                               f"got {s.answer_rule!r}")
    metrics = [m for m in KINDS[s.kind] if m != "f1_positive" or s.positive_label is not None]
    if not isinstance(s.columns, tuple) or not s.columns or not all(
            isinstance(col, tuple) and len(col) == 2 and col[0] in metrics and isinstance(col[1], str) and col[1]
            for col in s.columns):
        return "columns", (f"expected a non-empty tuple of (metric, header) with a metric of {', '.join(metrics)}, "
                           f"got {s.columns!r}")
    return None


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


TASKS: dict[str, TaskSpec] = {}  # canonical name -> spec, in table order: the paper's Table 1, then ours


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task (its fields were checked when the TaskSpec was built). A name or file name that another task
    already answers to is refused: canonical_task must resolve every spelling to one task."""
    if not isinstance(spec, TaskSpec):
        raise DataError(f"register_task: expected a TaskSpec, got {type(spec).__name__}")
    for other in TASKS.values():
        if {_key(spec.name), _key(spec.file_name)} & {_key(other.name), _key(other.file_name)}:
            raise DataError(f"task {spec.name!r}: field 'name': {spec.name!r} / {spec.file_name!r} is already "
                            f"taken by task {other.name!r}")
    TASKS[spec.name] = spec
    return spec


# The registered tasks, in table order: the paper's Table 1, then ours. A new task goes here ('Adding a task' above).
for _spec in (
    TaskSpec(name="LaMP-1", file_name="LaMP_1", kind="label", labels=("[1]", "[2]"), positive_label="[1]",
             item_fields=("title", "abstract"), doc_fields=("title", "abstract"),
             query_marker=None, folder="LaMP_1",  # the query is the two reference titles (`_citation_query`)
             item_layout=(("paper title", "title", False),), history_name="papers this user has written",
             answer_form='exactly "[1]" or "[2]", brackets included', answer_rule="citation",
             columns=(("accuracy", "L1 acc"), ("f1_positive", "L1 F1"), ("f1_macro", "L1 F1-macro"))),
    TaskSpec(name="LaMP-2", file_name="LaMP_2", kind="label", labels=LAMP2_TAGS,
             item_fields=("description", "tag"), doc_fields=("description",),
             query_marker="description:", folder="LaMP_2", subfolder="new",
             item_layout=(("movie", "description", True), ("tag", "tag", False)),
             history_name="movies this user has tagged",
             answer_form="exactly one of these tags, spelled as listed: " + ", ".join(LAMP2_TAGS),
             answer_rule="label", columns=(("accuracy", "L2 acc"), ("f1_macro", "L2 F1"))),
    TaskSpec(name="LaMP-3", file_name="LaMP_3", kind="rating", labels=RATINGS,
             item_fields=("text", "score"), doc_fields=("text",), query_marker="review:", folder="LaMP_3",
             item_layout=(("review", "text", True), ("score", "score", False)),
             history_name="reviews this user has scored", answer_form="a single integer from 1 to 5",
             answer_rule="rating", columns=(("mae", "L3 MAE"), ("rmse", "L3 RMSE"))),
    TaskSpec(name="LaMP-4", file_name="LaMP_4", kind="generation",
             item_fields=("text", "title"), doc_fields=("title", "text"), query_marker="article:", folder="LaMP_4",
             item_layout=(("article", "text", True), ("headline", "title", False)),
             history_name="articles this user has headlined", answer_form="the headline alone, on one line",
             answer_rule="text", columns=(("rouge1", "L4 R-1"), ("rougeL", "L4 R-L"))),
    TaskSpec(name="LaMP-5", file_name="LaMP_5", kind="generation",
             item_fields=("title", "abstract"), doc_fields=("title", "abstract"), query_marker="paper:",
             folder="LaMP_5", item_layout=(("abstract", "abstract", True), ("title", "title", False)),
             history_name="papers this user has titled", answer_form="the title alone, on one line",
             answer_rule="text", columns=(("rouge1", "L5 R-1"), ("rougeL", "L5 R-L"))),
    TaskSpec(name="LaMP-7", file_name="LaMP_7", kind="generation",
             item_fields=("text",), doc_fields=("text",), query_marker=":", folder="LaMP_7",
             item_layout=(("tweet", "text", True),),
             history_name="tweets this user has written", answer_form="the rewritten tweet alone",
             answer_rule="text", columns=(("rouge1", "L7 R-1"), ("rougeL", "L7 R-L"))),
    # PGraphRAG inputs are written by minitagpr.data.pgraphrag, which places these markers; no LaMP download folder.
    TaskSpec(name="PGraphRAG-title", file_name="PGraphRAG-title", kind="generation",
             item_fields=("text", "title"), doc_fields=("title", "text"), query_marker="review:",
             item_layout=(("review", "text", True), ("title", "title", False)),
             history_name="reviews this user has titled", answer_form="the review title alone, on one line",
             answer_rule="text", columns=(("rouge1", "PG-title R-1"), ("rougeL", "PG-title R-L"))),
    TaskSpec(name="PGraphRAG-rating", file_name="PGraphRAG-rating", kind="rating", labels=RATINGS,
             item_fields=("text", "title", "score"), doc_fields=("title", "text"), query_marker="title:",
             item_layout=(("title", "title", False), ("review", "text", True), ("score", "score", False)),
             history_name="reviews this user has scored", answer_form="a single integer from 1 to 5",
             answer_rule="rating", columns=(("mae", "PG-rating MAE"), ("rmse", "PG-rating RMSE"))),
):
    register_task(_spec)


class TaskTable(Mapping):
    """A read-only {task: fact(spec)} over the registered tasks (those `keep` accepts), read from TASKS on every
    access, so a task registered later is in it: the per-module tables older code imports (prompts.ANSWER_FORMS,
    answers.LABELS, ...) kept as views of the one registry."""

    def __init__(self, fact: Callable[[TaskSpec], Any], keep: Callable[[TaskSpec], bool] = lambda spec: True):
        self._fact, self._keep = fact, keep

    def __getitem__(self, task: str) -> Any:
        spec = TASKS.get(task)
        if spec is None or not self._keep(spec):
            raise KeyError(task)
        return self._fact(spec)

    def __iter__(self) -> Iterator[str]:
        return (name for name, spec in TASKS.items() if self._keep(spec))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class TaskList(Sequence):
    """A read-only list of `rows(spec)` over the registered tasks, in table order, read from TASKS on every access
    (answers.TASKS: the names; metrics.COLUMNS: (task, metric, header) rows)."""

    def __init__(self, rows: Callable[[TaskSpec], Iterable]):
        self._rows = rows

    def _all(self) -> list:
        return [row for spec in TASKS.values() for row in self._rows(spec)]

    def __getitem__(self, i):
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator:
        return iter(self._all())

    def __eq__(self, other):
        return self._all() == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return repr(self._all())


_NUMERIC_FIELDS = {"score"}  # LaMP-3 scores may be written as numbers or strings; every other field is a string


def canonical_task(name: Any) -> str:
    """'LaMP_3', 'LaMP-3' and 'lamp-3' -> 'LaMP-3'; any registered name or file name, in any case, with '_' for
    '-'. Unknown names raise DataError."""
    if isinstance(name, str):
        if name in TASKS:
            return name
        m = re.fullmatch(r"lamp[-_ ]?(\d)", name.strip(), flags=re.IGNORECASE)
        if m and f"LaMP-{m.group(1)}" in TASKS:
            return f"LaMP-{m.group(1)}"
        for canon, spec in TASKS.items():
            if _key(name) in (_key(canon), _key(spec.file_name)):
                return canon
    raise DataError(f"unknown task {name!r}; expected one of {', '.join(TASKS)} (or 'LaMP_k')")


def task_spec(name: str) -> TaskSpec:
    return TASKS[canonical_task(name)]


# ----------------------------------------------------------------------------------------------------------------
# The example type and the per-task query

@dataclass
class LampExample:
    """One question: the `input` text, the user's whole profile (items are the parsed dicts, not copies)."""
    id: str
    task: str                        # canonical task name
    input: str
    profile: list[dict]
    user_id: str | None = None       # time split (and PGraphRAG) carry it; in the user split each question is a user

    @property
    def user(self) -> str:
        """A stable user key: `user_id` when the file gives one, else the question id (user split: one per user)."""
        return self.user_id if self.user_id is not None else self.id


def _citation_query(text: str) -> str | None:
    # LaMP-1 input ends with: [1]: "<title>" [2]: "<title>"; titles may themselves hold quotes, so anchor on markers.
    m = re.search(r'\[1\]:\s*"(.*)"\s*\[2\]:\s*"(.*)"', text, flags=re.DOTALL)
    return f"{m.group(1).strip()} {m.group(2).strip()}" if m else None


def _cut_query(spec: TaskSpec, text: str) -> str:
    """The query item inside an `input` text; if it has none, a DataError saying what is wrong (callers add where)."""
    if spec.query_marker is None:
        query = _citation_query(text)
        if query is None:
            raise DataError(f"expected '[1]: \"<title>\" [2]: \"<title>\"' in {text[:80]!r}...")
        return query
    at = text.find(spec.query_marker)
    if at < 0:
        raise DataError(f"no {spec.query_marker!r} marker before the query in {text[:80]!r}...")
    return text[at + len(spec.query_marker):].strip()


def query_text(example: LampExample) -> str:
    """The retrieval query inside `example.input` (lamp-format.md: the per-task query item)."""
    spec = task_spec(example.task)
    try:
        return _cut_query(spec, example.input)
    except DataError as e:
        raise DataError(f"example {example.id!r} ({example.task}): field 'input': {e}") from None


def item_document(task: str, item: Mapping[str, Any]) -> str:
    """The text BM25 and dense retrievers index for one profile item."""
    spec = task_spec(task)
    missing = [f for f in spec.doc_fields if f not in item]
    if missing:
        raise DataError(f"profile item {item.get('id')!r} ({spec.name}): field {missing[0]!r}: missing")
    return " ".join(str(item[f]) for f in spec.doc_fields)


def date_key(value: Any) -> tuple[int, ...] | None:
    """A sortable key for a profile date, or None when it cannot be read.

    LaMP dates are years (int or "2011") or "YYYY-MM-DD"; we compare the integer tuple of the '-'-separated parts,
    like the benchmark's own recency ranking, and also accept an ISO time part ("2012-06-01T10:20:30" or with a space).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value,)
    if not isinstance(value, str):
        return None
    day, _, clock = value.strip().replace("T", " ", 1).partition(" ")
    try:
        key = tuple(int(p) for p in day.split("-"))
        if clock:
            key += tuple(int(float(p)) for p in clock.split(":"))  # float(): seconds may carry a fraction
    except (ValueError, OverflowError):  # OverflowError: "inf" or "1e400" in the clock part
        return None
    return key


# ----------------------------------------------------------------------------------------------------------------
# Readers

def not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a data file, for an error message: "file not found" or "is a folder, not a file"."""
    return "is a folder, not a file" if Path(path).is_dir() else "file not found"


def json_object_lines(path: Path, fail: Callable[[int, str], Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file. Lines are decoded one by one, so a bad byte,
    bad JSON or a value that is not an object is reported on its own line: `fail(line number, what is wrong)`
    builds the error raised (each reader names file and line its own way)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise fail(lineno, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                                   f"line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise fail(lineno, f"not valid JSON ({e.msg}; column {e.colno})") from None
            if not isinstance(obj, dict):
                raise fail(lineno, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None


def type_name(value: Any) -> str:
    return type(value).__name__


_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_problem(text: str) -> str | None:
    """Why `text` cannot be written or tokenised as UTF-8 (None when it can): JSON's "\\ud83d" escape without its
    other half decodes to a lone surrogate, which every later UTF-8 write or tokenizer call would fail on deep inside."""
    match = _SURROGATE.search(text)
    if match is None:
        return None
    return (f"holds a lone UTF-16 surrogate \\u{ord(match.group()):04x} at character {match.start()} (half of an "
            f"escaped emoji or other character; not valid Unicode text: repair the file)")


def _rating(value: Any) -> float | None:
    """A 1-5 rating written as a number or a numeric string (4, 4.0, "4"), or None when `value` is not one."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        return None
    return number if 1 <= number <= 5 else None  # NaN fails both comparisons, so it is refused too


def _check_item(path: Path, index: int, rec_id: str, j: int, item: Any, spec: TaskSpec) -> None:
    at = lambda f: where(path, index, rec_id, f"profile[{j}]" + (f".{f}" if f else ""))  # noqa: E731
    if not isinstance(item, dict):
        raise DataError(f"{at(None)}: expected an object, got {type_name(item)}")
    for name in ("id",) + spec.item_fields:
        if name not in item:
            raise DataError(f"{at(name)}: missing (every {spec.name} profile item needs "
                            f"{', '.join(('id',) + spec.item_fields)})")
        value = item[name]
        numeric_ok = name in _NUMERIC_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, str) or numeric_ok):
            raise DataError(f"{at(name)}: expected a string, got {type_name(value)} {value!r}")
        if isinstance(value, str) and (why := surrogate_problem(value)):
            raise DataError(f"{at(name)}: {why}")
    if "score" in spec.item_fields and _rating(item["score"]) is None:
        raise DataError(f"{at('score')}: expected a rating from 1 to 5, got {item['score']!r}")
    # null is an undated item, as RecencyRetriever treats it; a date that is there must be readable
    if item.get("date") is not None and date_key(item["date"]) is None:
        raise DataError(f"{at('date')}: cannot read date {item['date']!r} (expected a year or 'YYYY-MM-DD')")


def load_questions(path: str | os.PathLike, task: str) -> list[LampExample]:
    """Read and validate a `*_questions.json` file of `task` ('LaMP-k', 'LaMP_k' or a PGraphRAG task)."""
    path = Path(path)
    spec = task_spec(task)
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of question records, got {type_name(records)}")
    examples: list[LampExample] = []
    seen: dict[str, int] = {}
    for index, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{where(path, index)}: expected an object, got {type_name(rec)}")
        rec_id = rec.get("id")
        for name, kind in (("id", str), ("input", str), ("profile", list)):
            if name not in rec:
                raise DataError(f"{where(path, index, rec_id, name)}: missing")
            if not isinstance(rec[name], kind):
                raise DataError(f"{where(path, index, rec_id, name)}: expected {kind.__name__}, "
                                f"got {type_name(rec[name])} {str(rec[name])[:40]!r}")
        if rec_id in seen:
            raise DataError(f"{where(path, index, rec_id, 'id')}: duplicate id (first at record {seen[rec_id]})")
        seen[rec_id] = index
        for name in ("id", "input"):  # both reach UTF-8 files later (predictions, generations)
            if why := surrogate_problem(rec[name]):
                raise DataError(f"{where(path, index, rec_id, name)}: {why}")
        try:
            _cut_query(spec, rec["input"])  # checked here, where the error can name the file and the record
        except DataError as e:
            raise DataError(f"{where(path, index, rec_id, 'input')}: {e}") from None
        profile = rec["profile"]
        if not profile:
            raise DataError(f"{where(path, index, rec_id, 'profile')}: empty profile (every question needs at "
                            f"least one profile item)")
        for j, item in enumerate(profile):
            _check_item(path, index, rec_id, j, item, spec)
        user_id = rec.get("user_id")
        if user_id is not None:
            if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
                raise DataError(f"{where(path, index, rec_id, 'user_id')}: expected a string, "
                                f"got {type_name(user_id)}")
            user_id = str(user_id)  # some dumps write numeric user ids; keys are strings everywhere else
            if why := surrogate_problem(user_id):  # it reaches the UTF-8 rollout and pair files
                raise DataError(f"{where(path, index, rec_id, 'user_id')}: {why}")
        examples.append(LampExample(rec_id, spec.name, rec["input"], profile, user_id))
    if not examples:  # refused here, naming the file, not at scoring time after other tasks were decoded
        raise DataError(f"{path}: no question records (an empty array)")
    return examples


def load_outputs(path: str | os.PathLike, task: str | None = None) -> tuple[str, dict[str, str]]:
    """Read and validate an outputs (or predictions) file -> (canonical task name, {id: output}) (`read_outputs`)."""
    file_task, outputs, _ = read_outputs(path, task)
    return file_task, outputs


def read_outputs(path: str | os.PathLike, task: str | None = None) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Read and validate an outputs (or predictions) file -> (canonical task name, {id: output}, its NOTE_KEY object
    ({} when it has none, as official files)).

    Pass `task` when the file holds golds: its `task` field must then name that task, and each gold of a label task
    must be one of the task's labels, each gold of a rating task a number from 1 to 5 (the official scoring reads it
    with float()). Predictions are read without `task`: every output must be a string, as the format says, but one
    that is no label or no number is scored as wrong, not refused.
    """
    path = Path(path)
    spec = task_spec(task) if task is not None else None
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object {{'task', 'golds'}}, got {type_name(data)}")
    for name, kind in (("task", str), ("golds", list)):
        if name not in data:
            raise DataError(f"{where(path, field=name)}: missing")
        if not isinstance(data[name], kind):
            raise DataError(f"{where(path, field=name)}: expected {kind.__name__}, got {type_name(data[name])}")
    try:
        file_task = canonical_task(data["task"])
    except DataError as e:
        raise DataError(f"{where(path, field='task')}: {e}") from None
    if spec is not None and file_task != spec.name:
        raise DataError(f"{where(path, field='task')}: the file holds {data['task']!r} ({file_task}), "
                        f"expected {spec.name}")
    outputs: dict[str, str] = {}
    for index, rec in enumerate(data["golds"]):
        if not isinstance(rec, dict):
            raise DataError(f"{where(path, index, field='golds')}: expected an object, got {type_name(rec)}")
        rec_id = rec.get("id")
        for name in ("id", "output"):
            if name not in rec:
                raise DataError(f"{where(path, index, rec_id, 'golds.' + name)}: missing")
            if not isinstance(rec[name], str):
                raise DataError(f"{where(path, index, rec_id, 'golds.' + name)}: expected str, "
                                f"got {type_name(rec[name])} {rec[name]!r}")
        if rec_id in outputs:
            raise DataError(f"{where(path, index, rec_id, 'golds.id')}: duplicate id")
        output = rec["output"]
        for name in ("id", "output"):
            if why := surrogate_problem(rec[name]):
                raise DataError(f"{where(path, index, rec_id, 'golds.' + name)}: {why}")
        if spec is not None and (why := gold_problem(spec.name, output)):
            raise DataError(f"{where(path, index, rec_id, 'golds.output')}: {why}")
        outputs[rec_id] = output
    note = data.get(NOTE_KEY, {})
    if not isinstance(note, dict):
        raise DataError(f"{where(path, field=NOTE_KEY)}: expected an object, got {type_name(note)}")
    return file_task, outputs, note


def check_no_extra_golds(golds: Mapping[str, str], examples: Sequence[LampExample], outputs_path,
                         questions_path=None) -> None:
    """Raise a DataError naming the outputs file when it holds golds for ids that no question has: a LaMP part's
    questions and outputs match one to one (the official evaluation requires it). Check the whole file, before any
    subset (a limit, a sample) is taken from the questions."""
    asked = {ex.id for ex in examples}
    extra = [i for i in golds if i not in asked]
    if extra:
        where = f" in {questions_path}" if questions_path is not None else ""
        raise DataError(f"{outputs_path}: gold output(s) for id(s) with no question{where}: "
                        f"{', '.join(map(repr, extra[:10]))}{' ...' if len(extra) > 10 else ''} "
                        f"(ids must match one to one)")


def gold_problem(task: str, output: str) -> str | None:
    """Why `output` cannot be a gold answer of `task` (None when it can): a label task's gold must be one of its
    labels once stripped, a rating task's a number from 1 to 5 (the official scoring strips a label gold and reads a
    rating gold with float(), which skips surrounding white space too; so do `metrics` and `rewards`)."""
    spec = task_spec(task)
    if spec.kind == "label" and output.strip() not in spec.labels:
        return f"{output!r} is not a {spec.name} label (expected one of {', '.join(map(repr, spec.labels))})"
    if spec.kind == "rating" and _rating(output) is None:
        return f"expected a rating from 1 to 5, got {output!r}"
    return None


SPLITS = ("user", "time")  # LaMP's two ways of holding out: by user, by time
PARTS = ("train", "dev", "test")  # a split's parts; test outputs are not published
GOLD_PARTS = PARTS[:2]  # the parts with outputs to train on or score against


def split_files(root: str | os.PathLike, task: str, split: str = "user", part: str = "dev") -> tuple[Path, Path]:
    """(questions, outputs) paths of one part ('train', 'dev', 'test') of a LaMP download under `root`.

    User split: `<folder>/{part}/{part}_questions.json` (`folder` of the task's TaskSpec: `LaMP_k`); time split:
    `time/<folder>/...`. A task with a `subfolder` keeps its files there: LaMP-2 is the movie-tagging version under
    `LaMP_2/new/`; for the time split a plain `LaMP_2/` folder is used when no `new/` exists. A task with no
    `folder` (PGraphRAG) is not part of a LaMP download.
    """
    spec = task_spec(task)
    if spec.folder is None:
        raise DataError(f"split_files: {spec.name} is not a LaMP task")
    if split not in SPLITS:
        raise DataError(f"split_files: split must be 'user' or 'time', got {split!r}")
    folder = Path(root) / ("time" if split == "time" else "") / spec.folder
    if spec.subfolder and (split == "user" or (folder / spec.subfolder).exists() or not folder.exists()):
        folder = folder / spec.subfolder
    folder = folder / part
    return folder / f"{part}_questions.json", folder / f"{part}_outputs.json"


# ----------------------------------------------------------------------------------------------------------------
# Writers (fixtures, the demo world, prediction files)

def write_questions(path: str | os.PathLike, examples: Iterable[LampExample]) -> Path:
    """Write examples as a LaMP questions file (`user_id` only where set)."""
    records = []
    for ex in examples:
        rec: dict[str, Any] = {"id": ex.id, "input": ex.input, "profile": ex.profile}
        if ex.user_id is not None:
            rec["user_id"] = ex.user_id
        records.append(rec)
    return atomic_write_json(path, records)


NOTE_KEY = "minitagpr"  # an extra top-level key of a predictions file: how its answers were written (readers of the
#                        LaMP format ignore it)


def write_outputs(path: str | os.PathLike, task: str, outputs: Mapping[str, str],
                  note: Mapping[str, Any] | None = None) -> Path:
    """Write {id: output} as a LaMP outputs/predictions file, task spelled the benchmark's way ('LaMP_k'); `note`
    (e.g. {"normalize": true}) goes under NOTE_KEY."""
    spec = task_spec(task)
    golds = [{"id": str(i), "output": str(o)} for i, o in outputs.items()]
    return atomic_write_json(path, {"task": spec.file_name, "golds": golds, **({NOTE_KEY: dict(note)} if note else {})})

