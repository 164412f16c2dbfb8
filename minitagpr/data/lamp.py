"""LaMP files: the example type, per-task metadata, validating readers and atomic writers.

A LaMP download holds, per task and split, a questions file (a JSON array of `{"id", "input", "profile"}` records,
time-split records may add `"user_id"`) and an outputs file (`{"task": "LaMP_k", "golds": [{"id", "output"}]}`);
prediction files share the outputs shape. See ../shared/docs/lamp-format.md.

Everything the rest of the project needs to know about a task lives in `TASKS` (one `TaskSpec` per task):
the profile-item fields every item must carry, the fields that make an item's BM25 document, how the retrieval
query is cut out of the `input`, and the kind of answer (label / rating / generated text). The two PGraphRAG tasks
(built by `minitagpr.data.pgraphrag`) are described here too, so retrievers and prompts treat all eight alike.

Validation is strict and early: a bad record raises `DataError` naming the file, the record (index and id) and the
field, never a deep stack trace and never a silent skip. Readers keep the parsed profile lists as they are (no
copies): train profiles run to hundreds of MB.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence


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
# Task metadata

LAMP2_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)  # the fixed order in which LaMP-2 inputs list the 15 movie tags


@dataclass(frozen=True)
class TaskSpec:
    name: str                        # canonical name, e.g. "LaMP-3"
    file_name: str                   # how outputs files spell it, e.g. "LaMP_3"
    kind: str                        # "label" (fixed label set), "rating" (1-5, MAE/RMSE) or "generation" (ROUGE)
    item_fields: tuple[str, ...]     # fields every profile item must carry besides "id"
    doc_fields: tuple[str, ...]      # joined with a space into the item's BM25 document
    query_marker: str | None         # the query is the input after the first occurrence of this marker
    labels: tuple[str, ...] = ()     # the answer set of "label" and "rating" tasks, as strings

    @property
    def is_classification(self) -> bool:
        """Classification in the sense of docs/interfaces.md (exact-match reward): label and rating tasks."""
        return self.kind in ("label", "rating")


_RATINGS = ("1", "2", "3", "4", "5")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    # LaMP-1's query is the two reference titles, cut out by `_citation_query` (no single marker).
    TaskSpec("LaMP-1", "LaMP_1", "label", ("title", "abstract"), ("title", "abstract"), None, ("[1]", "[2]")),
    TaskSpec("LaMP-2", "LaMP_2", "label", ("description", "tag"), ("description",), "description:", LAMP2_TAGS),
    TaskSpec("LaMP-3", "LaMP_3", "rating", ("text", "score"), ("text",), "review:", _RATINGS),
    TaskSpec("LaMP-4", "LaMP_4", "generation", ("text", "title"), ("title", "text"), "article:"),
    TaskSpec("LaMP-5", "LaMP_5", "generation", ("title", "abstract"), ("title", "abstract"), "paper:"),
    TaskSpec("LaMP-7", "LaMP_7", "generation", ("text",), ("text",), ":"),
    # PGraphRAG inputs are written by minitagpr.data.pgraphrag, which places these markers.
    TaskSpec("PGraphRAG-title", "PGraphRAG-title", "generation", ("text", "title"), ("title", "text"), "review:"),
    TaskSpec("PGraphRAG-rating", "PGraphRAG-rating", "rating", ("text", "title", "score"), ("title", "text"),
             "title:", _RATINGS),
)}

_NUMERIC_FIELDS = {"score"}  # LaMP-3 scores may be written as numbers or strings; every other field is a string


def canonical_task(name: Any) -> str:
    """'LaMP_3', 'LaMP-3' and 'lamp-3' -> 'LaMP-3'; PGraphRAG names pass through. Unknown names raise DataError."""
    if isinstance(name, str):
        if name in TASKS:
            return name
        m = re.fullmatch(r"lamp[-_ ]?(\d)", name.strip(), flags=re.IGNORECASE)
        if m and f"LaMP-{m.group(1)}" in TASKS:
            return f"LaMP-{m.group(1)}"
        for canon in TASKS:
            if canon.lower() == name.strip().lower().replace("_", "-"):
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
    except ValueError:
        return None
    return key


# ----------------------------------------------------------------------------------------------------------------
# Readers

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
                raise fail(lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
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
        raise DataError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None


def type_name(value: Any) -> str:
    return type(value).__name__


def _rating(value: Any) -> float | None:
    """A 1-5 rating written as a number or a numeric string (4, 4.0, "4"), or None when `value` is not one."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
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
        examples.append(LampExample(rec_id, spec.name, rec["input"], profile, user_id))
    return examples


def load_outputs(path: str | os.PathLike, task: str | None = None) -> tuple[str, dict[str, str]]:
    """Read and validate an outputs (or predictions) file -> (canonical task name, {id: output}).

    Pass `task` when the file holds golds: its `task` field must then name that task, and each gold of a label task
    must be one of the task's labels, each gold of a rating task a number from 1 to 5 (the official scoring reads it
    with float()). Predictions are read without `task`: an unreadable prediction is scored as wrong, not refused.
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
        if spec is not None and (why := gold_problem(spec.name, output)):
            raise DataError(f"{where(path, index, rec_id, 'golds.output')}: {why}")
        outputs[rec_id] = output
    return file_task, outputs


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
    labels, a rating task's a number from 1 to 5 (the official scoring reads it as one)."""
    spec = task_spec(task)
    if spec.kind == "label" and output not in spec.labels:
        return f"{output!r} is not a {spec.name} label (expected one of {', '.join(map(repr, spec.labels))})"
    if spec.kind == "rating" and _rating(output) is None:
        return f"expected a rating from 1 to 5, got {output!r}"
    return None


def split_files(root: str | os.PathLike, task: str, split: str = "user", part: str = "dev") -> tuple[Path, Path]:
    """(questions, outputs) paths of one part ('train', 'dev', 'test') of a LaMP download under `root`.

    User split: `LaMP_k/{part}/{part}_questions.json`; time split: `time/LaMP_k/...`. LaMP-2 is the movie-tagging
    version under `LaMP_2/new/`; for the time split a plain `LaMP_2/` folder is used when no `new/` exists.
    """
    spec = task_spec(task)
    if not spec.name.startswith("LaMP-"):
        raise DataError(f"split_files: {spec.name} is not a LaMP task")
    if split not in ("user", "time"):
        raise DataError(f"split_files: split must be 'user' or 'time', got {split!r}")
    folder = Path(root) / ("time" if split == "time" else "") / spec.file_name
    if spec.name == "LaMP-2" and (split == "user" or (folder / "new").exists() or not folder.exists()):
        folder = folder / "new"
    folder = folder / part
    return folder / f"{part}_questions.json", folder / f"{part}_outputs.json"


# ----------------------------------------------------------------------------------------------------------------
# Writers (fixtures, the demo world, prediction files)

def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it over `path` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same folder: rename is atomic
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_questions(path: str | os.PathLike, examples: Iterable[LampExample]) -> Path:
    """Write examples as a LaMP questions file (`user_id` only where set)."""
    records = []
    for ex in examples:
        rec: dict[str, Any] = {"id": ex.id, "input": ex.input, "profile": ex.profile}
        if ex.user_id is not None:
            rec["user_id"] = ex.user_id
        records.append(rec)
    return atomic_write_json(path, records)


def write_outputs(path: str | os.PathLike, task: str, outputs: Mapping[str, str]) -> Path:
    """Write {id: output} as a LaMP outputs/predictions file, task spelled the benchmark's way ('LaMP_k')."""
    spec = task_spec(task)
    golds = [{"id": str(i), "output": str(o)} for i, o in outputs.items()]
    return atomic_write_json(path, {"task": spec.file_name, "golds": golds})
