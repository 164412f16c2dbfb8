"""Stage 0 of TagPR: build the tagged reasoning-chain dataset (tagpr-method.md, "Stage 0") as rerunnable stages.

Every stage reads JSONL from the output folder and writes JSONL there (atomically: temp file + rename), plus its
counts to `stats/<stage>.json`, so any stage can be rerun alone:

    stage     reads                         writes             what it does
    sample    a LaMP download (lamp_root)   instances.jsonl    per task, `per_task` training questions (seeded),
                                                               their gold and the k retrieved profile items
    teacher   instances.jsonl               teacher.jsonl      N (`samples`) teacher chains per instance
    accuracy  teacher.jsonl                 accurate.jsonl     keep correct answers: exact after normalisation
                                                               (classification), ROUGE > threshold (generation)
    judge     accurate.jsonl                judged.jsonl       LLM judge, four dimensions 1-5 in JSON; keep
                                                               total > `min_judge_total` (15 of 20)
    explore   judged.jsonl                  explored.jsonl     free-form tagging of a seeded subset
    cluster   explored.jsonl                clusters.json/.md  tag names embedded (TF-IDF character n-grams, or
                                                               the policy's embeddings) + K-means; a report to
                                                               inspect (the nine tags themselves are fixed)
    tag       judged.jsonl                  tagged.jsonl       restricted tagging with the nine tags
    format    tagged.jsonl                  formatted.jsonl    keep chains that pass the rewards module's tag and
                                                               format checks and still hold the teacher's words,
                                                               in order (tagger replies cut off: dropped)
    sft       formatted.jsonl               sft.jsonl          SFT records (docs/interfaces.md), at most
                                                               `max_per_instance` per instance
    report    stats/*.json, formatted.jsonl report.md/.png     counts per stage and task, the final count against
                                                               the spec's ~10,000, judge histogram, tag
                                                               frequencies, a seeded spot-check sample

Stages that call an endpoint (teacher, judge, explore, tag) go through `chain_client.ChatClient` with one cache
file per stage under `cache/`: a killed or failed run, rerun with the same settings, repeats no answered request,
and the outputs do not depend on how often the run was interrupted (records keep input order; the teacher's
per-sample seed is a hash of (data.seed, instance id, sample index)).

Lineage: each stage's `stats/<stage>.json` records the sha256 of the file it wrote and of the files it read. A stage
refuses to start when an upstream file is not the one its stage wrote last (edited by hand: delete that stage's
stats file to take it as it is) or was built from another version of its own input (an earlier stage was rerun
with other settings since, e.g. the judge's threshold, and the stages between were not): it names the stages to
rerun. Folders written before lineage was recorded are not checked.

Counting: for every filter stage and task, `in == out + sum(dropped)`; the teacher's `out` is `in * samples`.
Unparsable judge replies and malformed tags are counted under their drop reason, never a crash. Every record a
stage drops is also listed in `dropped/<stage>.jsonl`, one line `{"id", "reason", "detail"}` in record order,
written like the stage's output (whole, atomically); `not_sampled` and `outside_subset` are selections, not
drops of bad records, and are counted only.

The restricted tag set is the spec's nine tags (rewards.TAGS) and at least 3 segments, fixed: RL's R_tag and the
SFT prompt check exactly these, so a chain tagged otherwise would fail R_tag. Only a tag's definition (the text
the tagger reads) may be reworded.

This module touches no tensors; the policy-embedding option of the cluster stage takes an `embed_fn` from the
recipe (recipes/build_chains.py).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import random
import re
import time
import uuid
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from minitagpr.config import ConfigError, check_choice
from minitagpr.data import chain_prompts
from minitagpr.data.answers import extract_answer, normalize
from minitagpr.data.chain_client import (
    REFUSED, ChatClient, ChatRequest, EndpointConfig, ResponseCache, Transport, resolve_endpoint,
)
from minitagpr.data.lamp import (
    GOLD_PARTS, SPLITS, TASKS as TASK_SPECS, DataError, LampExample, canonical_task, check_no_extra_golds,
    json_object_lines, load_outputs, load_questions, read_json, split_files,
)
from minitagpr.data.prompts import STYLES, TAG_MEANINGS, build_messages
from minitagpr.data.retrieval import ENCODERLESS, get_retriever
from minitagpr.rewards import MIN_TAGS, TAGS, check_tags, format_reward, verifiable_reward

LAMP_TASKS = ("LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7")
STAGES = ("sample", "teacher", "accuracy", "judge", "explore", "cluster", "tag", "format", "sft", "report")
FILES = {"sample": "instances.jsonl", "teacher": "teacher.jsonl", "accuracy": "accurate.jsonl",
         "judge": "judged.jsonl", "explore": "explored.jsonl", "cluster": "clusters.json", "tag": "tagged.jsonl",
         "format": "formatted.jsonl", "sft": "sft.jsonl", "report": "report.md"}
ROLE_OF_STAGE = {"teacher": "teacher", "judge": "judge", "explore": "tagger", "tag": "tagger"}
# the stages whose output files each stage reads (the report reads stats/ and formatted.jsonl)
STAGE_INPUTS = {"teacher": ("sample",), "accuracy": ("teacher", "sample"), "judge": ("accuracy", "sample"),
                "explore": ("judge",), "cluster": ("explore",), "tag": ("judge",), "format": ("tag",),
                "sft": ("format", "sample"), "report": ("format",)}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPEC_CHAINS = 10_000  # tagpr-method.md, Stage 0: "about 10,000 chains"


class ChainDataError(DataError):
    """A stage input that cannot be used; names the file, line, record id and field."""


# ---------------------------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    lamp_root: str = ""           # a LaMP download (or a demo world): the layout of lamp.split_files
    tasks: list[str] = field(default_factory=lambda: list(LAMP_TASKS))  # LaMP tasks (LaMP-1..5, LaMP-7)
    split: str = "user"           # user | time
    part: str = "train"           # the part sampled: train | dev (LaMP's test has no golds)
    per_task: int = 1000          # questions sampled per task (seeded; all when the task has fewer)
    retriever: str = "recency"    # recency | bm25 | bm25okapi | random (seeded by data.seed)
    k: int = 8                    # retrieved profile items shown per prompt (0 = none)
    seed: int = 0                 # sampling, subset and per-request seeds

    def __post_init__(self):
        self.tasks = [canonical_task(t) for t in self.tasks]
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:  # the sample stage would write every instance of such a task twice
            raise ValueError(f"data.tasks names {', '.join(repeated)} more than once")
        check_choice("data.retriever", self.retriever, ENCODERLESS)
        check_choice("data.split", self.split, SPLITS)
        check_choice("data.part", self.part, GOLD_PARTS)
        if self.per_task < 1 or self.k < 0:
            raise ValueError(f"data.per_task must be >= 1 and data.k >= 0, got {self.per_task} and {self.k}")


@dataclass
class TeacherEndpoint(EndpointConfig):
    temperature: float = 0.6      # Qwen3's recommended sampling for thinking mode
    top_p: float = 0.95
    max_tokens: int = 8192


@dataclass
class JudgeEndpoint(EndpointConfig):
    temperature: float = 0.0
    max_tokens: int = 1024
    max_unusable_in_a_row: int = 20  # judge replies in a row that give no verdict (cut off, no JSON, a missing or
    #                                  bad score) that stop the run: a judge model or prompt that cannot answer the
    #                                  format would otherwise spend the whole judge budget; 0: never stop

    def __post_init__(self):
        super().__post_init__()
        if self.max_unusable_in_a_row < 0:
            raise ValueError(f"max_unusable_in_a_row must be >= 0 (0: never stop), got {self.max_unusable_in_a_row}")


@dataclass
class TaggerEndpoint(EndpointConfig):
    temperature: float = 0.0
    max_tokens: int = 8192        # the reply repeats the whole chain


@dataclass
class FilterConfig:
    normalize_answers: bool = True  # answers.normalize before exact match, and on the SFT records' classification
    #                                 answers (off: the official strict rule, answers as written)
    rouge_variant: str = "rougeL"   # rouge1 | rouge2 | rougeL: the ROUGE of the generation tasks' accuracy filter
    rouge_threshold: float = 0.3    # generation chains are kept when ROUGE > this
    min_judge_total: int = 15       # kept when the judge's total > this (of 20)
    min_tags: int = MIN_TAGS     # R_tag's minimum number of segments (fixed: 3)
    min_overlap: float = 0.9        # tagged chain vs teacher chain: share of words kept, in order
    max_per_instance: int = 0       # SFT chains kept per instance, best judged first (0: all)

    def __post_init__(self):
        if self.rouge_variant not in ("rouge1", "rouge2", "rougeL"):
            raise ValueError(f"filters.rouge_variant must be rouge1, rouge2 or rougeL, got {self.rouge_variant!r}")
        if self.min_tags != MIN_TAGS:  # a chain with fewer segments would fail R_tag at RL time
            raise ValueError(f"filters.min_tags must be {MIN_TAGS}, got {self.min_tags}: RL's R_tag and the SFT "
                             f"prompt require at least {MIN_TAGS} tagged segments (tagpr-method.md)")
        if self.max_per_instance < 0:
            raise ValueError(f"filters.max_per_instance must be >= 0 (0: all), got {self.max_per_instance}")
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError(f"filters.min_overlap must be in [0, 1], got {self.min_overlap}")
        if not 0.0 <= self.rouge_threshold <= 1.0:  # ROUGE is a fraction: 30 (a percentage) would drop every chain
            raise ValueError(f"filters.rouge_threshold must be in [0, 1] (ROUGE is a fraction), got "
                             f"{self.rouge_threshold}")
        dims = len(chain_prompts.JUDGE_DIMENSIONS)
        low, high = dims * chain_prompts.SCORE_MIN, dims * chain_prompts.SCORE_MAX
        if not low - 1 <= self.min_judge_total <= high:  # kept when total > this
            raise ValueError(f"filters.min_judge_total must be from {low - 1} to {high} (a chain is kept when its "
                             f"judge total, {low}-{high}, is above it), got {self.min_judge_total}")


@dataclass
class TaggingConfig:
    explore_subset: int = 500     # judged chains (a seeded choice) given to exploratory tagging
    embedder: str = "tfidf"       # tfidf (character n-grams) | policy (the checkpoint's token embeddings)
    policy_checkpoint: str = ""   # for embedder=policy: a local HF folder (safetensors + tokenizer files)
    n_clusters: int = 9           # K-means clusters of the explored tag names (fewer if there are fewer names)
    names_per_cluster: int = 8    # names listed per cluster in the report
    # The restricted set: the nine tags in rewards.TAGS order, each a bare name (its definition comes from
    # prompts.TAG_MEANINGS) or "name=definition" (another wording for the tagger). No other set: see the docstring.
    tags: list[str] = field(default_factory=lambda: list(TAGS))

    def __post_init__(self):
        if self.embedder not in ("tfidf", "policy"):
            raise ValueError(f"tagging.embedder must be tfidf or policy, got {self.embedder!r}")
        if self.embedder == "policy" and not self.policy_checkpoint:
            raise ValueError("tagging.embedder=policy needs tagging.policy_checkpoint=PATH")
        if self.n_clusters < 1 or self.explore_subset < 0:
            raise ValueError("tagging.n_clusters must be >= 1 and tagging.explore_subset >= 0")
        names = list(self.tag_definitions())  # validates every entry first
        if names != list(TAGS):  # chains tagged with another set would fail R_tag on every chain at RL time
            raise ValueError(f"tagging.tags must be the spec's nine tags in this order: {', '.join(TAGS)} (got "
                             f"{', '.join(names)}); RL's R_tag and the SFT prompt use exactly these, so clusters.md "
                             f"is for inspection only (a definition may be reworded as name=definition)")

    def tag_definitions(self) -> dict[str, str]:
        """{tag name: definition} of the restricted set."""
        out: dict[str, str] = {}
        for entry in self.tags:
            name, sep, meaning = entry.partition("=")
            name = name.strip()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
                raise ValueError(f"tagging.tags: {name!r} is not a tag name (letters, digits, _ and -)")
            if name == "think":
                raise ValueError("tagging.tags: 'think' is the reasoning block's own marker, not a segment tag")
            if name in out:
                raise ValueError(f"tagging.tags: {name!r} is given more than once")
            if sep and not meaning.strip():
                raise ValueError(f"tagging.tags: {name!r} has an empty definition")
            if name not in TAG_MEANINGS:
                raise ValueError(f"tagging.tags: {name!r} is not one of the nine tags ({', '.join(TAG_MEANINGS)})")
            out[name] = meaning.strip() if sep else TAG_MEANINGS[name]
        if not out:
            raise ValueError("tagging.tags is empty")
        return out


@dataclass
class ChainsConfig:
    """recipes/build_chains.py: every key can be set in YAML or as key=value."""

    out_dir: str = "runs/chains"  # every stage's JSONL, stats/, dropped/, cache/ and the report
    stages: list[str] = field(default_factory=lambda: ["all"])  # "all" or a subset of sample, teacher, accuracy,
    #                                                             judge, explore, cluster, tag, format, sft, report
    #                                                             (run in that order)
    samples: int = 16             # teacher chains per instance (N)
    prompt_style: str = "full"    # full | brief: the policy prompt of the SFT records; train and evaluate alike
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherEndpoint = field(default_factory=TeacherEndpoint)
    judge: JudgeEndpoint = field(default_factory=JudgeEndpoint)
    tagger: TaggerEndpoint = field(default_factory=TaggerEndpoint)
    filters: FilterConfig = field(default_factory=FilterConfig)
    tagging: TaggingConfig = field(default_factory=TaggingConfig)
    # The policy's tokenizer folder: the sft stage then tokenizes its records as recipes/sft.py does (chat template,
    # thinking on) and the report counts per task those that fit SFT's sft_seq_len whole (recipes/sft.py stops on a
    # longer one unless drop_long/truncate_long). Empty: not measured.
    sft_tokenizer: str = ""
    sft_seq_len: int = 4096       # SFT's seq_len (sft_qwen3_8b.yaml: 4096)

    def __post_init__(self):
        if self.sft_seq_len < 1:
            raise ValueError(f"sft_seq_len must be >= 1, got {self.sft_seq_len}")
        unknown = [s for s in self.stages if s != "all" and s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown {', '.join(unknown)}; choose from all, {', '.join(STAGES)}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.prompt_style not in STYLES:
            raise ValueError(f"prompt_style must be one of {', '.join(STYLES)}, got {self.prompt_style!r}")

    def stage_list(self) -> list[str]:
        return list(STAGES) if "all" in self.stages else [s for s in STAGES if s in self.stages]


# ---------------------------------------------------------------------------------------------------------------
# 2. Files: validated JSONL reading, atomic JSONL writing, per-stage counts
# ---------------------------------------------------------------------------------------------------------------
INSTANCE_FIELDS = {"id": str, "task": str, "example_id": str, "input": str, "profile": list, "gold": str}
CHAIN_FIELDS = {"id": str, "instance": str, "task": str, "sample": int, "chain": (str, type(None)),
                "answer": (str, type(None))}
NESTED_FIELDS = {"judge": {"scores": dict, "total": int}}  # checked inside a record field of that name


def read_jsonl(path: Path, fields: Mapping[str, type | tuple], producer: str) -> Iterator[dict]:
    """Records of a stage file, each checked for `fields`; errors name the file, line, record id and field."""
    for _, record in _numbered_records(path, fields, producer):
        yield record


def _numbered_records(path: Path, fields: Mapping[str, type | tuple], producer: str,
                      id_kind: str = "record") -> Iterator[tuple[int, dict]]:
    """(line number, record) for the records of `read_jsonl`; an id on two lines is an error naming both."""
    if not path.is_file():
        if path.is_dir():
            raise ChainDataError(f"{path}: is a folder, not a file (stage {producer!r} writes this file)")
        raise ChainDataError(f"{path}: file not found; it is written by stage {producer!r} (run that stage first)")
    first_line: dict[str, int] = {}
    for line_no, record in json_object_lines(path, lambda n, msg: ChainDataError(f"{path}: line {n}: {msg}")):
        at = f"{path}: line {line_no} (id {record.get('id')!r})"
        _check_fields(record, fields, at)
        for name in fields.keys() & NESTED_FIELDS.keys():
            _check_fields(record[name], NESTED_FIELDS[name], at, prefix=f"{name}.")
        if "task" in fields and record["task"] not in TASK_SPECS:
            raise ChainDataError(f"{at}: field 'task': unknown task {record['task']!r}")
        if "id" in fields:
            if record["id"] in first_line:
                raise ChainDataError(f"{at}: field 'id': duplicate {id_kind} id (first on line "
                                     f"{first_line[record['id']]})")
            first_line[record["id"]] = line_no
        yield line_no, record


def _check_fields(record: Mapping, fields: Mapping[str, type | tuple], at: str, prefix: str = "") -> None:
    for name, kind in fields.items():
        where = f"{at}: field {prefix + name!r}"
        if name not in record:
            raise ChainDataError(f"{where}: missing")
        if not isinstance(record[name], kind) or isinstance(record[name], bool) and kind is int:
            raise ChainDataError(f"{where}: expected {_kind_name(kind)}, got {type(record[name]).__name__}")


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


class AtomicWriter:
    """Write a file through a temporary sibling, renamed over the target only when the block ends cleanly."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")

    def __enter__(self) -> "AtomicWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_orphans()
        self._file = open(self.tmp, "x", encoding="utf-8")
        return self

    def _remove_orphans(self) -> None:
        """Delete temp siblings left by a writer that was killed (its process no longer exists)."""
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            match = re.fullmatch(rf"\.{re.escape(self.path.name)}\.(\d+)\.[0-9a-f]+\.tmp", tmp.name)
            if match is None:
                continue
            try:
                os.kill(int(match.group(1)), 0)  # signal 0: only asks whether the process exists
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except PermissionError:
                pass  # alive, owned by someone else

    def write(self, text: str) -> None:
        self._file.write(text)

    def record(self, record: Mapping) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with AtomicWriter(path) as f:
        f.write(text)


class DropLog(AtomicWriter):
    """`dropped/<stage>.jsonl`: one line `{"id", "reason", "detail"}` per record the stage drops, counted in `counts`
    too. Written like the stage's output (whole, renamed into place when the stage ends cleanly, in record order), so
    a killed and resumed run neither loses nor repeats a line."""

    def __init__(self, out_dir: Path, stage: str, counts: "StageCounts"):
        super().__init__(out_dir / "dropped" / f"{stage}.jsonl")
        self.counts = counts

    def drop(self, task: str, record_id: str, reason: str, detail: str) -> None:
        self.counts.drop(task, reason)
        self.record({"id": record_id, "reason": reason, "detail": detail})


class StageCounts:
    """Per task: records in, records out, and drops by reason (`in == out + sum(dropped)` for filters)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.tasks: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self.lineage: dict[str, Any] = {}  # {"output": sha256, "inputs": {stage: sha256}} (module docstring)

    def _row(self, task: str) -> dict[str, Any]:
        return self.tasks.setdefault(task, {"in": 0, "out": 0, "dropped": Counter()})

    def seen(self, task: str, n: int = 1) -> None:
        self._row(task)["in"] += n

    def kept(self, task: str, n: int = 1) -> None:
        self._row(task)["out"] += n

    def drop(self, task: str, reason: str, n: int = 1) -> None:
        self._row(task)["dropped"][reason] += n

    def total(self, key: str) -> int:
        return sum(row[key] for row in self.tasks.values())

    def to_dict(self) -> dict[str, Any]:
        tasks = {t: {"in": r["in"], "out": r["out"], "dropped": dict(sorted(r["dropped"].items()))}
                 for t, r in self.tasks.items()}
        return {"stage": self.stage, "tasks": tasks, "extra": self.extra, "lineage": self.lineage}

    def save(self, out_dir: Path) -> None:
        write_text(out_dir / "stats" / f"{self.stage}.json", json.dumps(self.to_dict(), indent=1) + "\n")


def load_instances(out_dir: Path) -> dict[str, dict]:
    """{instance id: instance} of instances.jsonl, in file order; an id on two lines is an error naming both."""
    path = out_dir / FILES["sample"]
    instances = {}
    for line_no, inst in _numbered_records(path, INSTANCE_FIELDS, "sample", id_kind="instance"):
        at = f"{path}: line {line_no} (id {inst['id']!r})"
        if not isinstance(inst.get("user"), (str, type(None))):  # optional: older files have none
            raise ChainDataError(f"{at}: field 'user': expected str or null, got {type(inst['user']).__name__}")
        for j, item in enumerate(inst["profile"]):
            if not isinstance(item, dict):
                raise ChainDataError(f"{at}: field 'profile[{j}]': expected an object, got {type(item).__name__}")
        instances[inst["id"]] = inst
    return instances


def instance_digest(inst: Mapping) -> str:
    """A fingerprint of what an instance asks and expects (task, input, profile items, gold). The teacher stage
    stores it in each record, so a later stage run after `sample` was rerun with other settings (same ids, other
    profiles or golds) is refused instead of pairing old chains with new prompts."""
    content = {name: inst[name] for name in ("task", "input", "profile", "gold")}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _instance_of(instances: Mapping[str, dict], record: dict, path: Path) -> dict:
    inst = instances.get(record["instance"])
    rerun = "was stage 'sample' rerun with other settings? rerun the later stages too"
    if inst is None:
        raise ChainDataError(f"{path}: record id {record['id']!r}: field 'instance': {record['instance']!r} is not in "
                             f"{FILES['sample']} ({rerun})")
    if record["task"] != inst["task"]:
        raise ChainDataError(f"{path}: record id {record['id']!r}: field 'task': {record['task']!r}, but instance "
                             f"{inst['id']!r} in {FILES['sample']} is {inst['task']!r}")
    stored = record.get("instance_digest")  # absent in files written before it was recorded
    if stored is not None and stored != instance_digest(inst):
        raise ChainDataError(f"{path}: record id {record['id']!r}: field 'instance_digest': instance "
                             f"{inst['id']!r} in {FILES['sample']} is not the one this chain answered (its input, "
                             f"profile or gold changed; {rerun})")
    return inst


def _prompt(build: Callable[[], list[dict]], source: Path, record_id: str) -> list[dict]:
    """Messages from `build()`, with a bad stored profile item reported against the stage file and record."""
    try:
        return build()
    except DataError as err:
        raise ChainDataError(f"{source}: record id {record_id!r}: {err}") from None


def sample_seed(seed: int, instance_id: str, sample: int) -> int:
    """The per-request seed of sample j of an instance: a hash, so it never depends on order or interruptions."""
    digest = hashlib.sha256(f"{seed}/{instance_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# 3. Reading replies: reasoning + answer, judge JSON, tags
# ---------------------------------------------------------------------------------------------------------------
_MARKERS = (THINK_OPEN, THINK_CLOSE, "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def split_reasoning(response: Mapping[str, Any]) -> tuple[str | None, str]:
    """(chain, answer) of a teacher response. The chain is the endpoint's separate reasoning field when it has one
    (vLLM's reasoning parser), else the text before the last `</think>` of the content (a leading `<think>`
    removed); the answer is `answers.extract_answer(content)`. chain=None when there is no reasoning, or when it
    holds chat or think markers of its own (two think blocks, a leaked turn)."""
    content = response.get("content") or ""
    reasoning = response.get("reasoning")
    answer = extract_answer(content)
    if isinstance(reasoning, str) and reasoning.strip():
        chain = reasoning.strip()
    elif THINK_CLOSE in content:
        chain = content[: content.rfind(THINK_CLOSE)].strip()
        if chain.startswith(THINK_OPEN):
            chain = chain[len(THINK_OPEN):].strip()
    else:
        return None, answer
    if not chain or any(marker in chain for marker in _MARKERS):
        return None, answer
    return chain, answer


class ReplyError(ValueError):
    """A judge or tagger reply we cannot use; `reason` is its drop reason in the stage counts."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# Other spellings of the judge's keys that models produce (after `_key` folding).
_DIMENSION_ALIASES = {
    "logical_coherence": ("coherence", "logic", "logical_consistency"),
    "step_accuracy": ("accuracy", "step_by_step_accuracy", "accuracy_of_steps"),
    "reasoning_completeness": ("completeness", "complete_reasoning", "completeness_of_reasoning"),
    "relevance": ("relevance_to_the_question", "relevance_to_question", "question_relevance"),
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def _json_objects(text: str) -> Iterator[dict]:
    """Every JSON object embedded in `text` (prose, code fences and think blocks around it are fine), outermost
    first; a trailing comma before `}` or `]` is forgiven."""
    decoder = json.JSONDecoder()
    for source in (text, re.sub(r",(\s*[}\]])", r"\1", text)):
        pos = source.find("{")
        while pos >= 0:
            try:
                obj, end = decoder.raw_decode(source, pos)
            except json.JSONDecodeError:
                pos = source.find("{", pos + 1)
                continue
            if isinstance(obj, dict):
                yield obj
            pos = source.find("{", end)


def _nested_dimensions(obj: dict) -> Iterator[dict[str, Any]]:
    """{dimension: raw value} of `obj` and of every object nested in it (e.g. {"evaluation": {"scores": {...}}}),
    outer ones first (breadth first); objects naming no dimension are skipped."""
    queue = [obj]
    while queue:
        candidate = queue.pop(0)
        folded = {_key(k): v for k, v in candidate.items()}
        found = {}
        for dim, aliases in _DIMENSION_ALIASES.items():
            for name in (dim,) + aliases:
                if name in folded:
                    found[dim] = folded[name]
                    break
        if found:
            yield found
        queue.extend(v for v in candidate.values() if isinstance(v, dict))


def _score(value: Any) -> int | None:
    """A 1-5 whole number from 4, 4.0, "4", "4/5" or {"score": 4}; None when it is none of these."""
    if isinstance(value, dict):
        folded = {_key(k): v for k, v in value.items()}
        value = folded.get("score", folded.get("rating"))
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.0+)?)\s*(?:/\s*5)?\s*", value)
        value = float(match.group(1)) if match else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None  # (Python's json reads NaN, Infinity and 1e999 as floats)
    if value != int(value):
        return None
    value = int(value)
    return value if chain_prompts.SCORE_MIN <= value <= chain_prompts.SCORE_MAX else None


def parse_judge_reply(text: str | None) -> dict[str, int]:
    """The four 1-5 scores of a judge reply, {dimension: score}; raises ReplyError(reason) when unusable.

    Tolerant: prose, code fences or a think block around the JSON; key spellings (case, spaces, known aliases);
    scores as numbers, numeric strings ("4", "4/5") or {"score": n} objects. Strict: all four dimensions present
    and each a whole number 1-5 (reasons "judge_no_json", "judge_missing_field", "judge_bad_score"; a think block
    that never closes holds drafts only: "judge_unfinished"). A "total" in the reply is not trusted: the total is
    the sum of the four scores.
    """
    text = text or ""
    if THINK_CLOSE in text:  # a reasoning judge's drafts are not its answer
        text = text[text.rfind(THINK_CLOSE) + len(THINK_CLOSE):]
    if THINK_OPEN in text:  # a think block never closed: the reply holds drafts only, cut before any verdict
        raise ReplyError("judge_unfinished", "a think block that never closes: no verdict after it")
    # the object naming the most dimensions, at any depth, then the one whose values are most often scores (a
    # {"reasoning": {dim: text}} beside {"scores": {dim: n}}, in either order); the first on a tie
    found = max((d for obj in _json_objects(text) for d in _nested_dimensions(obj)),
                key=lambda d: (len(d), sum(_score(v) is not None for v in d.values())), default=None)
    if found is None:
        raise ReplyError("judge_no_json", "no JSON object with the judge's dimensions in the reply")
    missing = [d for d in chain_prompts.JUDGE_DIMENSIONS if d not in found]
    if missing:
        raise ReplyError("judge_missing_field", f"the reply's JSON lacks {', '.join(missing)}")
    scores = {}
    for dim in chain_prompts.JUDGE_DIMENSIONS:
        score = _score(found[dim])
        if score is None:
            raise ReplyError("judge_bad_score", f"{dim}: {found[dim]!r} is not a whole number from "
                                                f"{chain_prompts.SCORE_MIN} to {chain_prompts.SCORE_MAX}")
        scores[dim] = score
    return scores


_OPEN_TAG_RE = re.compile(r"<([A-Za-z_][A-Za-z0-9_\- ]{0,60})>")
_TAG_TOKEN_RE = re.compile(r"</?[A-Za-z_][A-Za-z0-9_\-]*>")


def _reply_body(text: str | None) -> str:
    """A tagger reply without a think block or code fences around it."""
    text = text or ""
    if THINK_CLOSE in text:
        text = text[text.rfind(THINK_CLOSE) + len(THINK_CLOSE):]
    return re.sub(r"```[A-Za-z]*", "", text)


def parse_free_tags(text: str | None) -> list[str]:
    """The segment names of an exploratory tagging reply, in order, folded to snake_case (`<Look at History>` ->
    `look_at_history`); only names that are also closed somewhere count, so stray `<...>` text is ignored, and a
    name that folds to nothing (`<_>`) is no name."""
    body = _reply_body(text)
    closed = {_key(m) for m in re.findall(r"</([A-Za-z_][A-Za-z0-9_\- ]{0,60})>", body)}
    return [_key(m) for m in _OPEN_TAG_RE.findall(body) if _key(m) in closed and _key(m) not in ("think", "")]


def split_tagged_reply(text: str | None) -> tuple[str, str | None, str]:
    """(prose before, tagged chain, prose after) of a restricted-tagging reply: the chain runs from its first tag
    to the end of its last closing tag (code fences and think blocks dropped); (body, None, "") when the reply holds
    no tag at all. A tag opened after the last closing tag keeps the rest of the reply, so the format stage sees the
    unclosed segment (and drops it) instead of a chain whose end was cut off silently."""
    body = _reply_body(text)
    tokens = list(_TAG_TOKEN_RE.finditer(body))
    closers = [t for t in tokens if t.group(0).startswith("</")]
    if not tokens or not closers:
        return body, None, ""
    start, end = tokens[0].start(), closers[-1].end()
    if tokens[-1].start() > closers[-1].start():  # an opening tag after the last closer: an unclosed segment
        end = len(body)
    return (body[:start], body[start:end].strip(), body[end:]) if end > start else (body, None, "")


def extract_tagged_chain(text: str | None) -> str | None:
    """The tagged chain inside a restricted-tagging reply (split_tagged_reply), None when it holds no tag."""
    return split_tagged_reply(text)[1]


def _words(text: str) -> list[str]:
    """The case-folded words of `text` (punctuation and white space aside): what the tagger checks compare."""
    return re.findall(r"\w+", text.lower())


def chain_words_outside(outside: Sequence[str], chain: str, tagged: str, n: int = 4) -> str | None:
    """The first run of `n` words (case-folded) that the prose around a tagged span (split_tagged_reply's first and
    last parts) shares with `chain` and that the tagged span lacks, or None. A tagger that leaves the chain's last
    sentence (its decision) untagged gives a chain cut before it, which the overlap filter's slack lets through;
    the tagger's own prose ("Here is the tagged chain:", or "... tagged by its role in the user's history") holds
    no run of the chain that the span lacks."""
    def grams_of(text: str) -> set[tuple[str, ...]]:
        words = _words(text)
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    grams = grams_of(chain) - grams_of(untagged(tagged))
    for piece in outside:
        left = _words(piece)
        for i in range(len(left) - n + 1):
            if tuple(left[i:i + n]) in grams:
                return " ".join(left[i:i + n])
    return None


def lost_ending(chain: str, tagged: str, n: int = 4) -> str | None:
    """The last `n` words of `chain` (case-folded, punctuation aside) when the tagged chain without its tags does
    not end with them, else None: a tagger that drops the chain's closing sentence (its decision) stays within
    the overlap filter's slack, and SFT would train a chain that never commits to its answer."""
    want = _words(chain)[-n:]
    got = _words(untagged(tagged))[-n:]
    return " ".join(want) if want != got else None


def untagged(chain: str) -> str:
    """The chain's text with every tag token removed."""
    return _TAG_TOKEN_RE.sub(" ", chain)


def word_overlap(original: str, tagged: str) -> float:
    """In-order word overlap of the tagged chain (tags removed) with the original chain: words matched in order
    (difflib's matching blocks, case-folded) over the longer word count. 1.0 when the tagger only inserted tags;
    lower when it dropped, added, reworded or reordered text (moving the decision to the front costs its words)."""
    a = _words(original)
    b = _words(untagged(tagged))
    if not a or not b:
        return 0.0
    matched = sum(block.size for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
    return matched / max(len(a), len(b))


# ---------------------------------------------------------------------------------------------------------------
# 4. Stages
# ---------------------------------------------------------------------------------------------------------------
class Context:
    """What every stage needs: the config, the output folder, a log, and how to reach endpoints."""

    def __init__(self, cfg: ChainsConfig, *, transports: Mapping[str, Transport] | None = None,
                 embed_fn: Callable[[list[str]], np.ndarray] | None = None,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.transports = dict(transports or {})  # role -> transport (tests); default: the openai client
        self.embed_fn = embed_fn
        self.log = log or (lambda msg: print(msg, flush=True))

    def path(self, stage: str) -> Path:
        return self.out / FILES[stage]

    def client(self, stage: str) -> ChatClient:
        role = ROLE_OF_STAGE[stage]
        cfg: EndpointConfig = getattr(self.cfg, role)
        endpoint = resolve_endpoint(cfg, role)
        cache = ResponseCache(self.out / "cache" / f"{stage}.jsonl")
        if cache.torn_lines:
            self.log(f"{stage}: cut off a torn last line in {cache.path} (a run was killed while writing it)")
        return ChatClient(endpoint, cfg, cache, stage, transport=self.transports.get(role), log=self.log)


class Progress:
    """A progress line at most every `every_s` seconds."""

    def __init__(self, ctx: Context, stage: str, client: ChatClient | None = None, every_s: float = 30.0):
        self.ctx, self.stage, self.client, self.every_s = ctx, stage, client, every_s
        self.done, self.last = 0, time.monotonic()

    def tick(self) -> None:
        self.done += 1
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.ctx.log(f"{self.stage}: {self.done} records" + self._calls())

    def _calls(self) -> str:
        c = self.client
        return "" if c is None else (f" ({c.calls} calls, {c.cached} from the cache, {c.retries} retries, "
                                     f"{c.refused} refused)")

    def finish(self, counts: StageCounts) -> None:
        self.ctx.log(f"{self.stage}: {counts.total('in')} in, {counts.total('out')} out" + self._calls())


def stage_sample(ctx: Context) -> StageCounts:
    """Per task: `per_task` training questions drawn with a seeded RNG (kept in file order), their gold answers
    and the `k` profile items the retriever selects (only those are stored)."""
    data = ctx.cfg.data
    if not data.lamp_root:
        raise ChainDataError("stage 'sample' needs data.lamp_root=PATH (a LaMP download or a demo world)")
    retriever = get_retriever(data.retriever, seed=data.seed)
    counts = StageCounts("sample")
    with AtomicWriter(ctx.path("sample")) as out:
        for task in data.tasks:
            q_path, o_path = split_files(data.lamp_root, task, data.split, data.part)
            examples = load_questions(q_path, task)
            _, golds = load_outputs(o_path, task)  # checks the file's task and that every gold is an answer
            check_no_extra_golds(golds, examples, o_path, q_path)  # the whole file, before `per_task` samples it
            rng = random.Random(f"{data.seed}/{task}")
            picked = sorted(rng.sample(range(len(examples)), min(data.per_task, len(examples))))
            counts.seen(task, len(examples))
            counts.drop(task, "not_sampled", len(examples) - len(picked))
            for index in picked:
                ex = examples[index]
                if ex.id not in golds:
                    raise ChainDataError(f"{o_path}: no gold output for question id {ex.id!r} (record {index} of "
                                         f"{q_path})")
                out.record({"id": f"{task}/{ex.id}", "task": task, "example_id": ex.id, "user": ex.user,
                            "input": ex.input, "profile": retriever.select(ex, data.k), "gold": golds[ex.id]})
                counts.kept(task)
    return counts


def stage_teacher(ctx: Context) -> StageCounts:
    """N = `samples` teacher responses per instance, each split into (chain, answer); nothing is dropped here
    (the accuracy stage counts what is unusable)."""
    cfg = ctx.cfg
    counts = StageCounts("teacher")
    client = ctx.client("teacher")
    source = ctx.path("sample")

    def requests() -> Iterator[ChatRequest]:
        for inst in load_instances(ctx.out).values():
            counts.seen(inst["task"])
            messages = _prompt(lambda: chain_prompts.teacher_messages(inst["task"], inst["input"], inst["profile"]),
                               source, inst["id"])
            for j in range(cfg.samples):
                yield ChatRequest(inst["id"], messages, sample=j, seed=sample_seed(cfg.data.seed, inst["id"], j),
                                  context=inst)

    progress = Progress(ctx, "teacher", client)
    # closing(): on any exception the answers in flight are cached before the cache file closes
    with client.cache, AtomicWriter(ctx.path("teacher")) as out, closing(client.run(requests())) as answers:
        for request, response in answers:
            inst = request.context
            chain, answer = split_reasoning(response)
            out.record({"id": f"{inst['id']}/{request.sample}", "instance": inst["id"], "task": inst["task"],
                        "instance_digest": instance_digest(inst),
                        "sample": request.sample, "chain": chain, "answer": answer,
                        "finish_reason": response.get("finish_reason"),
                        **({"refusal": response["refusal"]} if response.get("finish_reason") == REFUSED else {})})
            counts.kept(inst["task"])
            progress.tick()
    progress.finish(counts)
    return counts


def stage_accuracy(ctx: Context) -> StageCounts:
    """Keep chains whose answer is right: R_v = 1 for classification tasks (exact match after normalisation),
    R_v = ROUGE > `rouge_threshold` for generation tasks (rewards.verifiable_reward)."""
    f = ctx.cfg.filters
    instances = load_instances(ctx.out)
    counts = StageCounts("accuracy")
    source = ctx.path("teacher")
    with AtomicWriter(ctx.path("accuracy")) as out, DropLog(ctx.out, "accuracy", counts) as dropped:
        for rec in read_jsonl(source, CHAIN_FIELDS, "teacher"):
            task, rid = rec["task"], rec["id"]
            counts.seen(task)
            if rec.get("finish_reason") == REFUSED:  # the endpoint would not answer this request (chain_client)
                dropped.drop(task, rid, "endpoint_refused", str(rec.get("refusal")))
                continue
            # a cut-off reply first: its reasoning block may never have closed, and the cause to report is the cut
            if rec.get("finish_reason") == "length":  # the answer after a cut-off chain is not the teacher's answer
                dropped.drop(task, rid, "truncated", "finish_reason 'length': cut off at teacher.max_tokens")
                continue
            if rec["chain"] is None:
                dropped.drop(task, rid, "no_reasoning", "the reply has no reasoning block, or one holding chat or "
                                                        "think markers")
                continue
            if not rec["answer"]:
                dropped.drop(task, rid, "no_answer", "nothing after the reasoning")
                continue
            gold = _instance_of(instances, rec, source)["gold"]
            r_v = verifiable_reward(task, rec["answer"], gold, normalize_answers=f.normalize_answers,
                                    rouge_variant=f.rouge_variant)
            classification = TASK_SPECS[task].is_classification
            if classification and r_v < 1.0:
                dropped.drop(task, rid, "wrong_answer", f"answer {rec['answer'][:200]!r}, gold {gold!r}")
                continue
            if not classification and r_v <= f.rouge_threshold:
                dropped.drop(task, rid, "low_rouge", f"{f.rouge_variant} {r_v:.4f} <= rouge_threshold "
                                                     f"{f.rouge_threshold}")
                continue
            out.record({**rec, "accuracy": r_v})
            counts.kept(task)
    return counts


ACCURATE_FIELDS = {**CHAIN_FIELDS, "chain": str, "answer": str}


def stage_judge(ctx: Context) -> StageCounts:
    """The LLM filter: four dimensions scored 1-5; keep total > `min_judge_total`. Unusable replies are counted
    by reason and dropped. The histogram of totals (every parsed reply, kept or not) goes to the stats."""
    cfg = ctx.cfg
    instances = load_instances(ctx.out)
    counts = StageCounts("judge")
    histogram: dict[str, Counter] = {}
    client = ctx.client("judge")
    source = ctx.path("accuracy")

    def requests() -> Iterator[ChatRequest]:
        for rec in read_jsonl(source, ACCURATE_FIELDS, "accuracy"):
            inst = _instance_of(instances, rec, source)
            messages = _prompt(lambda: chain_prompts.judge_messages(rec["task"], inst["input"], inst["profile"],
                                                                    rec["chain"], rec["answer"]),
                               ctx.path("sample"), inst["id"])
            yield ChatRequest(rec["id"], messages, seed=sample_seed(cfg.data.seed, rec["id"], 0), context=rec)

    progress = Progress(ctx, "judge", client)
    unusable = 0  # replies in a row without a verdict (cfg.judge.max_unusable_in_a_row)

    def no_verdict(task: str, rid: str, reason: str, detail: str) -> None:
        nonlocal unusable
        dropped.drop(task, rid, reason, detail)
        unusable += 1
        if unusable == cfg.judge.max_unusable_in_a_row:  # every answer so far stays in the cache
            raise ChainDataError(f"judge: {unusable} replies in a row gave no verdict, the last {rid!r}: {reason}: "
                                 f"{detail}; check judge.model and judge.max_tokens (a rerun with another judge.model "
                                 f"or judge.cache_tag asks again; judge.max_unusable_in_a_row=0 never stops)")
    # closing(): on any exception the answers in flight are cached before the cache file closes
    with client.cache, AtomicWriter(ctx.path("judge")) as out, DropLog(ctx.out, "judge", counts) as dropped, \
            closing(client.run(requests())) as answers:
        for request, response in answers:
            rec, task = request.context, request.context["task"]
            counts.seen(task)
            progress.tick()
            if response.get("finish_reason") == REFUSED:
                dropped.drop(task, rec["id"], "endpoint_refused", response["refusal"])
                continue
            if response.get("finish_reason") == "length":  # a verdict cut off (or a draft read as one)
                no_verdict(task, rec["id"], "judge_truncated", "finish_reason 'length': cut off at judge.max_tokens")
                continue
            try:
                scores = parse_judge_reply(response.get("content"))
            except ReplyError as err:
                content = response.get("content") or ""
                no_verdict(task, rec["id"], err.reason, f"{err} (reply: {content[:200]!r})")
                continue
            unusable = 0
            total = sum(scores.values())
            histogram.setdefault(task, Counter())[total] += 1
            if total <= cfg.filters.min_judge_total:
                dropped.drop(task, rec["id"], "low_score", f"total {total} <= min_judge_total "
                                                           f"{cfg.filters.min_judge_total} ({json.dumps(scores)})")
                continue
            out.record({**rec, "judge": {"scores": scores, "total": total}})
            counts.kept(task)
    counts.extra["histogram"] = {t: {str(s): n for s, n in sorted(h.items())} for t, h in histogram.items()}
    progress.finish(counts)
    return counts


JUDGED_FIELDS = {**ACCURATE_FIELDS, "judge": dict}


def stage_explore(ctx: Context) -> StageCounts:
    """Exploratory tagging of a seeded subset of the judged chains: free-form segment names."""
    cfg = ctx.cfg
    source = ctx.path("judge")
    ids = [rec["id"] for rec in read_jsonl(source, JUDGED_FIELDS, "judge")]
    rng = random.Random(f"{cfg.data.seed}/explore")
    chosen = set(rng.sample(ids, min(cfg.tagging.explore_subset, len(ids))))
    counts = StageCounts("explore")
    client = ctx.client("explore")

    def requests() -> Iterator[ChatRequest]:
        for rec in read_jsonl(source, JUDGED_FIELDS, "judge"):
            counts.seen(rec["task"])
            if rec["id"] not in chosen:
                counts.drop(rec["task"], "outside_subset")
                continue
            yield ChatRequest(rec["id"], chain_prompts.explore_messages(rec["chain"]),
                              seed=sample_seed(cfg.data.seed, rec["id"], 0), context=rec)

    progress = Progress(ctx, "explore", client)
    # closing(): on any exception the answers in flight are cached before the cache file closes
    with client.cache, AtomicWriter(ctx.path("explore")) as out, DropLog(ctx.out, "explore", counts) as dropped, \
            closing(client.run(requests())) as answers:
        for request, response in answers:
            rec = request.context
            progress.tick()
            if response.get("finish_reason") == REFUSED:
                dropped.drop(rec["task"], rec["id"], "endpoint_refused", response["refusal"])
                continue
            names = parse_free_tags(response.get("content"))
            if not names:
                dropped.drop(rec["task"], rec["id"], "no_tags", "no segment <name> ... </name> in the reply")
                continue
            out.record({"id": rec["id"], "task": rec["task"], "tags": names})
            counts.kept(rec["task"])
    progress.finish(counts)
    return counts


def tfidf_embed(names: list[str]) -> np.ndarray:
    """Tag names as L2-normalised TF-IDF vectors of character 2-4-grams (within words; `_` read as a space), so
    `examine_examples`, `examining_example` and `review_examples` land close together."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4))
    return vectorizer.fit_transform([n.replace("_", " ") for n in names]).toarray()  # (n_names, n_ngrams)


def cluster_tag_names(counts: Mapping[str, int], embeddings: np.ndarray, n_clusters: int, seed: int = 0,
                      names_per_cluster: int = 8) -> list[dict]:
    """K-means over the distinct tag names (each weighted by how often it occurs), clusters by total occurrences.

    Each cluster: `occurrences` (segments named with any of its names), `share` of all segments, `representative`
    (its most frequent name), `central` (the name nearest the centroid) and its `names` with counts, most
    frequent first (at most `names_per_cluster`), plus `distinct` (how many names it holds).
    """
    from sklearn.cluster import KMeans

    names = list(counts)
    if not names:
        return []
    weights = np.array([counts[n] for n in names], dtype=np.float64)  # (n_names,)
    k = min(n_clusters, len(names))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(embeddings, sample_weight=weights)
    total = weights.sum()
    clusters = []
    for c in range(k):
        members = [i for i in range(len(names)) if km.labels_[i] == c]
        if not members:
            continue
        dist = np.linalg.norm(embeddings[members] - km.cluster_centers_[c], axis=1)  # (n_members,)
        ranked = sorted(members, key=lambda i: (-counts[names[i]], names[i]))
        occurrences = int(sum(counts[names[i]] for i in members))
        clusters.append({
            "representative": names[ranked[0]],
            "central": names[members[int(np.argmin(dist))]],
            "occurrences": occurrences,
            "share": round(occurrences / total, 4),
            "distinct": len(members),
            "names": [[names[i], counts[names[i]]] for i in ranked[:names_per_cluster]],
        })
    clusters.sort(key=lambda c: (-c["occurrences"], c["representative"]))
    return clusters


def stage_cluster(ctx: Context) -> StageCounts:
    """Embed the free-form tag names and cluster them; write clusters.json and clusters.md, a report to compare
    with the nine tags (Stage 0 step 4). The restricted set stays the spec's nine: RL's R_tag checks those."""
    t = ctx.cfg.tagging
    counts = StageCounts("cluster")
    names: Counter = Counter()
    source = ctx.path("explore")
    for line_no, rec in _numbered_records(source, {"id": str, "task": str, "tags": list}, "explore"):
        for j, name in enumerate(rec["tags"]):
            if not isinstance(name, str):
                raise ChainDataError(f"{source}: line {line_no} (id {rec['id']!r}): field 'tags[{j}]': expected str, "
                                     f"got {type(name).__name__}")
        counts.seen(rec["task"])
        counts.kept(rec["task"])
        names.update(rec["tags"])
    ordered = dict(sorted(names.items(), key=lambda kv: (-kv[1], kv[0])))
    clusters: list[dict] = []
    if ordered:
        if t.embedder == "policy":
            if ctx.embed_fn is None:
                raise ChainDataError("tagging.embedder=policy needs an embed_fn (recipes/build_chains.py makes one "
                                     "from tagging.policy_checkpoint)")
            embeddings = np.asarray(ctx.embed_fn(list(ordered)), dtype=np.float64)
        else:
            embeddings = tfidf_embed(list(ordered))
        if embeddings.shape[0] != len(ordered):
            raise ValueError(f"embed_fn returned {embeddings.shape[0]} rows for {len(ordered)} names")
        clusters = cluster_tag_names(ordered, embeddings, t.n_clusters, ctx.cfg.data.seed, t.names_per_cluster)
    result = {"embedder": t.embedder, "segments": sum(ordered.values()), "distinct_names": len(ordered),
              "clusters": clusters, "suggested_tags": [c["representative"] for c in clusters]}
    write_text(ctx.path("cluster"), json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    write_text(ctx.out / "clusters.md", clusters_markdown(result))
    counts.extra.update(distinct_names=len(ordered), clusters=len(clusters))
    return counts


def clusters_markdown(result: Mapping[str, Any]) -> str:
    lines = ["# Exploratory tag clusters", "",
             f"{result['segments']} segments named with {result['distinct_names']} distinct free-form tags, "
             f"embedded with `{result['embedder']}` and grouped by K-means (weighted by frequency). For inspection: "
             f"the restricted tagging uses the spec's nine tags, the set RL's tag reward R_tag checks.", ""]
    if not result["clusters"]:
        return "\n".join(lines + ["No tags were found.", ""])
    lines += ["| rank | representative | nearest centroid | segments | share | distinct names | names (count) |",
              "|---|---|---|---|---|---|---|"]
    for rank, c in enumerate(result["clusters"], 1):
        names = ", ".join(f"{n} ({k})" for n, k in c["names"])
        lines.append(f"| {rank} | {c['representative']} | {c['central']} | {c['occurrences']} | "
                     f"{100 * c['share']:.1f}% | {c['distinct']} | {names} |")
    return "\n".join(lines) + "\n"


def stage_tag(ctx: Context) -> StageCounts:
    """Restricted tagging: every judged chain re-segmented with the nine tags (and their definitions). The reply
    is stored as found (its tagged span, or null, and any chain words it left outside the span); the format stage
    decides whether it is usable."""
    cfg = ctx.cfg
    tags = cfg.tagging.tag_definitions()
    counts = StageCounts("tag")
    client = ctx.client("tag")

    def requests() -> Iterator[ChatRequest]:
        for rec in read_jsonl(ctx.path("judge"), JUDGED_FIELDS, "judge"):
            messages = chain_prompts.restricted_messages(rec["chain"], tags, cfg.filters.min_tags)
            yield ChatRequest(rec["id"], messages, seed=sample_seed(cfg.data.seed, rec["id"], 0), context=rec)

    progress = Progress(ctx, "tag", client)
    # closing(): on any exception the answers in flight are cached before the cache file closes
    with client.cache, AtomicWriter(ctx.path("tag")) as out, closing(client.run(requests())) as answers:
        for request, response in answers:
            rec = request.context
            counts.seen(rec["task"])
            progress.tick()
            before, tagged, after = split_tagged_reply(response.get("content"))
            out.record({**rec, "tagged": tagged,
                        "tagger_left_out": chain_words_outside((before, after), rec["chain"], tagged) if tagged
                        else None,
                        "tagger_finish_reason": response.get("finish_reason"),
                        **({"tagger_refusal": response["refusal"]} if response.get("finish_reason") == REFUSED
                           else {})})
            counts.kept(rec["task"])
    progress.finish(counts)
    return counts


def stage_format(ctx: Context) -> StageCounts:
    """Keep tagged chains that pass the tag reward's checks (syntax, only the nine tags, >= 3 segments), the format
    reward (no chat or think markers) and still hold the teacher's words."""
    cfg = ctx.cfg
    allowed = tuple(cfg.tagging.tag_definitions())
    counts = StageCounts("format")
    tag_errors: Counter = Counter()
    with AtomicWriter(ctx.path("format")) as out, DropLog(ctx.out, "format", counts) as dropped:
        for rec in read_jsonl(ctx.path("tag"), {**JUDGED_FIELDS, "tagged": (str, type(None))}, "tag"):
            task, rid, tagged = rec["task"], rec["id"], rec.pop("tagged")
            counts.seen(task)
            finish, refused = rec.pop("tagger_finish_reason", None), rec.pop("tagger_refusal", None)
            left_out = rec.pop("tagger_left_out", None)
            if finish == REFUSED:  # the endpoint would not answer this request (chain_client)
                dropped.drop(task, rid, "endpoint_refused", str(refused))
                continue
            if finish == "length":  # the reply was cut off: its end is missing
                dropped.drop(task, rid, "tagger_truncated", "finish_reason 'length': cut off at tagger.max_tokens")
                continue
            if tagged is None:
                dropped.drop(task, rid, "no_tags", "the tagger's reply holds no tag")
                continue
            if left_out is not None:  # the chain's own words outside the tagged span: the chain would be cut
                dropped.drop(task, rid, "untagged_text", f"the reply left chain text outside its tags "
                                                         f"(e.g. {left_out!r})")
                continue
            check = check_tags(tagged, allowed, cfg.filters.min_tags)
            if not check.ok:
                dropped.drop(task, rid, "tag_check", check.error)
                tag_errors[re.sub(r"\d+", "N", re.sub(r"<[^>]*>", "<tag>", check.error))] += 1
                continue
            if format_reward(f"{THINK_OPEN}\n{tagged}\n{THINK_CLOSE}\n\n{rec['answer']}") != 1.0:
                dropped.drop(task, rid, "markers", "a chat or think marker in the tagged chain or the answer")
                continue
            overlap = word_overlap(rec["chain"], tagged)
            if overlap < cfg.filters.min_overlap:
                dropped.drop(task, rid, "rewritten", f"word overlap {overlap:.4f} < min_overlap "
                                                     f"{cfg.filters.min_overlap}")
                continue
            if ending := lost_ending(rec["chain"], tagged):  # within the overlap's slack, but the decision is gone
                dropped.drop(task, rid, "ending_lost", f"the tagged chain does not end with the teacher's last words "
                                                       f"{ending!r}")
                continue
            out.record({**rec, "untagged_chain": rec["chain"], "chain": tagged})
            counts.kept(task)
    counts.extra["tag_errors"] = dict(sorted(tag_errors.items()))
    return counts


def stage_sft(ctx: Context) -> StageCounts:
    """SFT records `{"id", "user", "task", "messages", "chain", "answer"}` (docs/interfaces.md): the policy's own
    personalised prompt (prompts.build_messages over the stored profile items), the tagged chain, and the answer
    (classification answers in their canonical label form). With `max_per_instance`, the best judged chains of
    each instance are kept (ties: lower sample index). `prompt_style` picks the instruction's wording."""
    cfg = ctx.cfg
    tokenizer = policy_tokenizer(cfg.sft_tokenizer) if cfg.sft_tokenizer else None  # a bad folder fails first
    instances = load_instances(ctx.out)
    counts = StageCounts("sft")
    source = ctx.path("format")
    by_instance: dict[str, list[dict]] = {}
    for rec in read_jsonl(source, JUDGED_FIELDS, "format"):
        _instance_of(instances, rec, source)
        by_instance.setdefault(rec["instance"], []).append(rec)
    cap = cfg.filters.max_per_instance
    with AtomicWriter(ctx.path("sft")) as out, DropLog(ctx.out, "sft", counts) as dropped:
        for inst_id, records in by_instance.items():
            inst = instances[inst_id]
            task = inst["task"]
            counts.seen(task, len(records))
            keep = records
            if cap:
                best = sorted(records, key=lambda r: (-r["judge"]["total"], r["sample"]))
                keep = sorted(best[:cap], key=lambda r: r["sample"])
                for rec in sorted(best[cap:], key=lambda r: r["sample"]):
                    dropped.drop(task, rec["id"], "over_instance_cap", f"judge total {rec['judge']['total']}; "
                                 f"max_per_instance={cap} keeps the best judged of the instance's {len(records)}")
            example = LampExample(inst["example_id"], task, inst["input"], inst["profile"], inst.get("user"))
            messages = _prompt(lambda: build_messages(example, inst["profile"], style=cfg.prompt_style),
                               ctx.path("sample"), inst["id"])
            for rec in keep:
                answer = rec["answer"].strip()
                if TASK_SPECS[task].is_classification:
                    answer = normalize(task, answer, cfg.filters.normalize_answers)
                out.record({"id": rec["id"], "user": inst.get("user"), "task": task, "messages": messages,
                            "chain": rec["chain"], "answer": answer})
                counts.kept(task)
    counts.extra["max_per_instance"] = cap  # for the report's final count
    if tokenizer is not None and counts.total("out"):  # none kept: build_chains names the stage that emptied it
        counts.extra["seq_len_fit"] = seq_len_fit(ctx.path("sft"), tokenizer, cfg.sft_seq_len)
    return counts


def policy_tokenizer(folder: str):
    from minitagpr.tokenizer import Tokenizer, TokenizerError
    try:
        return Tokenizer.from_dir(folder)
    except TokenizerError as err:
        raise ConfigError(f"sft_tokenizer={folder}: {err}") from None


def seq_len_fit(path: Path, tokenizer, seq_len: int) -> dict[str, Any]:
    """Per task, how many SFT records of `path` fit `seq_len` tokens whole, tokenized as recipes/sft.py does:
    {"seq_len", "tokenizer", "tasks": {task: {"records", "fit", "longest"}}}. A record the SFT reader or tokenizer
    refuses is an error naming file and line here, not at SFT time."""
    from minitagpr.train import sft_data
    records = sft_data.read_sft_records(path)
    docs = sft_data.tokenize_records(records, tokenizer, path)
    tasks: dict[str, dict[str, int]] = {}
    for rec, doc in zip(records, docs):
        row = tasks.setdefault(rec.task, {"records": 0, "fit": 0, "longest": 0})
        row["records"] += 1
        row["fit"] += len(doc.ids) <= seq_len
        row["longest"] = max(row["longest"], len(doc.ids))
    return {"seq_len": seq_len, "tokenizer": str(tokenizer.source), "tasks": tasks}


# ---------------------------------------------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------------------------------------------
def tag_frequencies(path: Path, allowed: Sequence[str], min_tags: int) -> tuple[Counter, Counter, int]:
    """(segments per tag, chains containing each tag, chains) over a file of tagged chains."""
    segments, chains, n = Counter(), Counter(), 0
    if path.is_file():
        for rec in read_jsonl(path, {"id": str, "chain": str}, "format"):
            names = check_tags(rec["chain"], allowed, min_tags).segments
            segments.update(names)
            chains.update(set(names))
            n += 1
    return segments, chains, n


def stage_report(ctx: Context) -> StageCounts:
    """report.md (the final count against the spec's ~10,000, counts per stage and task with the files listing
    every dropped record, judge histogram, tag frequencies) and report.png (bar charts)."""
    stats = {}
    for stage in STAGES:
        path = ctx.out / "stats" / f"{stage}.json"
        if path.is_file():
            stats[stage] = read_stats(path)
    allowed = tuple(ctx.cfg.tagging.tag_definitions())
    segments, chains, n_chains = tag_frequencies(ctx.path("format"), allowed, ctx.cfg.filters.min_tags)
    histogram: Counter = Counter()
    for per_task in stats.get("judge", {}).get("extra", {}).get("histogram", {}).values():
        histogram.update({int(k): v for k, v in per_task.items()})
    drop_files = [f"dropped/{stage}.jsonl" for stage in STAGES if (ctx.out / "dropped" / f"{stage}.jsonl").is_file()]
    text = report_markdown(stats, histogram, segments, chains, n_chains, drop_files)
    write_text(ctx.path("report"), text + spot_check_markdown(ctx.path("format"), ctx.cfg.data.seed))
    plot_report(ctx.out / "report.png", histogram, segments)
    counts = StageCounts("report")
    counts.extra.update(chains=n_chains, segments=sum(segments.values()))
    return counts


def read_stats(path: Path) -> dict:
    """A stats/<stage>.json file as `StageCounts.save` writes it; a damaged one is an error naming file and field."""
    stats = read_json(path)

    def bad(field: str, expected: str) -> ChainDataError:
        return ChainDataError(f"{path}: field {field!r}: expected {expected} (rerun its stage to rewrite the file)")

    def is_count(n: Any) -> bool:
        return isinstance(n, int) and not isinstance(n, bool)

    if not isinstance(stats, dict):
        raise bad("(top level)", "an object")
    if not isinstance(stats.get("tasks"), dict):
        raise bad("tasks", "an object")
    for task, row in stats["tasks"].items():
        if not isinstance(row, dict):
            raise bad(f"tasks.{task}", "an object")
        for key in ("in", "out"):
            if not is_count(row.get(key)):
                raise bad(f"tasks.{task}.{key}", "a whole number")
        if not isinstance(row.get("dropped"), dict) or not all(map(is_count, row["dropped"].values())):
            raise bad(f"tasks.{task}.dropped", "an object of whole numbers")
    extra = stats.get("extra", {})
    histogram = extra.get("histogram", {}) if isinstance(extra, dict) else None
    if not isinstance(histogram, dict):
        raise bad("extra" if histogram is None else "extra.histogram", "an object")
    for task, per_total in histogram.items():
        if not isinstance(per_total, dict) or not all(k.isdigit() and is_count(n) for k, n in per_total.items()):
            raise bad(f"extra.histogram.{task}", "an object of {total: count} whole numbers")
    if not is_count(extra.get("max_per_instance", 0)):
        raise bad("extra.max_per_instance", "a whole number")
    fit = extra.get("seq_len_fit", {"seq_len": 1, "tasks": {}})
    if not (isinstance(fit, dict) and is_count(fit.get("seq_len")) and isinstance(fit.get("tasks"), dict)):
        raise bad("extra.seq_len_fit", "an object with a whole-number seq_len and per-task counts")
    for task, row in fit["tasks"].items():
        if not (isinstance(row, dict) and all(is_count(row.get(k)) for k in ("records", "fit", "longest"))):
            raise bad(f"extra.seq_len_fit.tasks.{task}", "an object of whole numbers records, fit, longest")
    return stats


def final_count_markdown(stats: Mapping[str, dict]) -> list[str]:
    """The SFT chains written, against the spec's "about 10,000", and what bounds the number."""
    lines = ["## Final count", ""]
    if "sft" not in stats:
        return lines + ["The sft stage has not run: no SFT chains yet.", ""]
    n = sum(row["out"] for row in stats["sft"]["tasks"].values())
    max_per_instance = stats["sft"].get("extra", {}).get("max_per_instance", 0)  # as the sft stage ran
    instances = sum(row["out"] for row in stats.get("sample", {"tasks": {}})["tasks"].values())
    cap = (f"filters.max_per_instance={max_per_instance} allows at most {max_per_instance} x {instances} sampled "
           f"instances = {max_per_instance * instances}" if max_per_instance else
           "filters.max_per_instance=0 keeps every chain that passed the filters")
    return lines + [f"**{n} SFT chains** in sft.jsonl; tagpr-method.md's Stage 0 has about {SPEC_CHAINS:,} "
                    f"({100 * n / SPEC_CHAINS:.0f}% of that). {cap}.", ""] + seq_len_markdown(stats["sft"])


def seq_len_markdown(sft_stats: Mapping[str, Any]) -> list[str]:
    """The sft stage's records against SFT's seq_len (`seq_len_fit`), when it was measured."""
    fit = sft_stats.get("extra", {}).get("seq_len_fit")
    if not fit:
        return ["Not measured against SFT's seq_len: set sft_tokenizer= (the policy's tokenizer folder) and "
                "sft_seq_len= to count the records recipes/sft.py can train whole.", ""]
    rows = fit["tasks"]
    total = {k: sum(r[k] for r in rows.values()) for k in ("records", "fit")}
    lines = [f"Records that fit SFT's seq_len={fit['seq_len']} whole (tokenizer {fit['tokenizer']}); recipes/sft.py "
             "stops on a longer one unless drop_long=true (left out) or truncate_long=true (cut):", "",
             "| task | records | fit | share | longest (tokens) |", "|---|---|---|---|---|"]
    longest = max((r["longest"] for r in rows.values()), default=0)
    for task, r in {**rows, "**all**": {**total, "longest": longest}}.items():
        share = f"{100 * r['fit'] / r['records']:.1f}%" if r["records"] else "-"
        lines.append(f"| {task} | {r['records']} | {r['fit']} | {share} | {r['longest']} |")
    return lines + [""]


def report_markdown(stats: Mapping[str, dict], histogram: Mapping[int, int], segments: Counter,
                    chains: Counter, n_chains: int, drop_files: Sequence[str] = ()) -> str:
    lines = ["# Tagged chain build", ""] + final_count_markdown(stats)
    lines += ["## Records in and out of every stage", "",
              "| stage | task | in | out | dropped |", "|---|---|---|---|---|"]
    for stage, s in stats.items():
        for task, row in s["tasks"].items():
            dropped = ", ".join(f"{r}: {n}" for r, n in row["dropped"].items()) or "-"
            lines.append(f"| {stage} | {task} | {row['in']} | {row['out']} | {dropped} |")
        if len(s["tasks"]) > 1:
            tin = sum(r["in"] for r in s["tasks"].values())
            tout = sum(r["out"] for r in s["tasks"].values())
            lines.append(f"| {stage} | **all** | {tin} | {tout} | |")
    if drop_files:
        lines += ["", "Every dropped record with its reason and detail, one JSON line each: "
                  + ", ".join(f"`{f}`" for f in drop_files) + " (`not_sampled` and `outside_subset` are selections, "
                  "counted only)."]
    lines += ["", "## Judge totals (four dimensions, 1-5 each)", ""]
    if histogram:
        lines += ["| total | chains |", "|---|---|"]
        lines += [f"| {t} | {histogram.get(t, 0)} |" for t in range(4, 21)]
    else:
        lines.append("No judged chains.")
    lines += ["", f"## Tag frequencies ({n_chains} chains after the format filter)", ""]
    total = sum(segments.values())
    if total:
        lines += ["| tag | segments | share of segments | chains with it |", "|---|---|---|---|"]
        for tag, n in sorted(segments.items(), key=lambda kv: (-kv[1], kv[0])):
            share = 100 * chains[tag] / n_chains
            lines.append(f"| {tag} | {n} | {100 * n / total:.1f}% | {chains[tag]} ({share:.0f}%) |")
    else:
        lines.append("No tagged chains.")
    return "\n".join(lines) + "\n"


def spot_check_markdown(path: Path, seed: int, n: int = 5) -> str:
    """A seeded handful of kept chains with their answers, for the manual spot check of Stage 0 step 6."""
    records = list(read_jsonl(path, {"id": str, "chain": str, "answer": str}, "format")) if path.is_file() else []
    if not records:
        return ""
    picked = sorted(random.Random(f"{seed}/spot-check").sample(range(len(records)), min(n, len(records))))
    lines = ["", f"## Spot check ({len(picked)} of {len(records)} kept chains, seeded)", ""]
    for i in picked:
        rec = records[i]
        lines += [f"**{rec['id']}** -> answer `{rec['answer']}`", "", "```", rec["chain"], "```", ""]
    return "\n".join(lines)


def plot_report(path: Path, histogram: Mapping[int, int], segments: Counter) -> None:
    """Two bar charts: tag frequencies and the judge total histogram (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, (ax_tags, ax_judge) = plt.subplots(1, 2, figsize=(12, 4.5))
    tags = sorted(segments.items(), key=lambda kv: (-kv[1], kv[0]))
    if tags:
        ax_tags.barh([t for t, _ in tags][::-1], [n for _, n in tags][::-1], color="tab:blue")
    else:
        ax_tags.text(0.5, 0.5, "no tagged chains", ha="center", va="center", transform=ax_tags.transAxes)
    ax_tags.set_title("tag frequency (segments)")
    totals = list(range(4, 21))
    ax_judge.bar(totals, [histogram.get(t, 0) for t in totals], color="tab:orange")
    ax_judge.set_title("judge total (kept when > threshold)")
    ax_judge.set_xlabel("total of four 1-5 scores")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# 6. Running stages
# ---------------------------------------------------------------------------------------------------------------
STAGE_FUNCTIONS: dict[str, Callable[[Context], StageCounts]] = {
    "sample": stage_sample, "teacher": stage_teacher, "accuracy": stage_accuracy, "judge": stage_judge,
    "explore": stage_explore, "cluster": stage_cluster, "tag": stage_tag, "format": stage_format,
    "sft": stage_sft, "report": stage_report,
}


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes (streamed), None when it does not exist."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upstream_stages(stage: str) -> list[str]:
    """Every stage whose output `stage` depends on, directly or not, nearest first."""
    upstream, todo = [], list(STAGE_INPUTS.get(stage, ()))
    while todo:
        s = todo.pop(0)
        if s not in upstream:
            upstream.append(s)
            todo += STAGE_INPUTS.get(s, ())
    return upstream


def check_lineage(ctx: Context, stage: str) -> None:
    """Refuse to run `stage` on upstream files that do not belong together (module docstring, "Lineage")."""
    upstream = upstream_stages(stage)
    digests: dict[str, str | None] = {}

    def digest(s: str) -> str | None:
        if s not in digests:
            digests[s] = file_sha256(ctx.path(s))
        return digests[s]
    for up in upstream:
        stats = ctx.out / "stats" / f"{up}.json"
        try:
            lineage = json.loads(stats.read_text(encoding="utf-8")).get("lineage") or {}
        except (OSError, ValueError, AttributeError):
            continue  # no stats (a file made by hand) or an older layout: nothing recorded to check against
        if lineage.get("output") and digest(up) not in (None, lineage["output"]):
            raise ChainDataError(f"{ctx.path(up)} is not the file stage {up!r} wrote last ({stats} records another "
                                 f"sha256): rerun stage {up!r}, or delete {stats} to use the file as it is")
        for source, recorded in (lineage.get("inputs") or {}).items():
            if source in FILES and digest(source) not in (None, recorded):
                later = [x for x in STAGES if x == up or (x in upstream and up in upstream_stages(x))]
                raise ChainDataError(f"{ctx.path(up)} was built from another {FILES[source]} (it changed since: stage "
                                     f"{source!r} was rerun, or the file edited); rerun stages {', '.join(later)} "
                                     f"before {stage!r}")


def run_stages(cfg: ChainsConfig, stages: Iterable[str] | None = None, **context_kwargs) -> dict[str, StageCounts]:
    """Run `stages` (default: the config's) in pipeline order; each writes its outputs and stats/<stage>.json (with
    its lineage), after checking that the files it builds on belong together (`check_lineage`)."""
    ctx = Context(cfg, **context_kwargs)
    ctx.out.mkdir(parents=True, exist_ok=True)
    wanted = cfg.stage_list() if stages is None else [s for s in STAGES if s in set(stages)]
    results = {}
    for stage in wanted:
        check_lineage(ctx, stage)
        counts = STAGE_FUNCTIONS[stage](ctx)
        if stage != "report":
            counts.lineage = {"output": file_sha256(ctx.path(stage)),
                              "inputs": {s: file_sha256(ctx.path(s)) for s in STAGE_INPUTS.get(stage, ())}}
            counts.save(ctx.out)
        results[stage] = counts
    return results
