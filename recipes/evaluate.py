"""Evaluate checkpoints (or prediction files) on LaMP / PGraphRAG / demo tasks and put them side by side.

    python recipes/evaluate.py --config recipes/configs/eval_demo.yaml \\
        checkpoints=base=runs/demo/base_demo,sft=runs/demo/sft/hf,guided=runs/demo/guided_rl/export
    python recipes/evaluate.py --config recipes/configs/eval_lamp.yaml data=/data/LaMP checkpoints=tagpr=...  # Table 1
    python recipes/evaluate.py --config recipes/configs/eval_robustness.yaml data=/data/LaMP checkpoints=...  # sweeps
    python recipes/evaluate.py data=/data/LaMP tasks=LaMP-1,LaMP-2 \\
        predictions=gemini=preds/LaMP_1.json,gemini=preds/LaMP_2.json
    (prediction files are scored as given, as the official evaluation does; extract_answers=true first takes the
    answer after the last </think> of each, for files of raw model responses)

For every checkpoint, task and (retriever, k) setting: retrieve k profile items, build the personalised prompt,
decode (greedy by default) with a rollout engine, keep the answer after the last `</think>`, and score it with
the official LaMP rules (`minitagpr.metrics.evaluate`; the project's answer normalisation only with
normalize=true). Written under out_dir:
  predictions/<row>/<LaMP_k>_predictions.json   official-format predictions (the extracted answers; an extra key
                                                 "minitagpr" says whether they were normalised)
  generations/<row>/<task>.jsonl                 the raw generations (id, text, finish reason, token counts)
  generations/<row>/<task>.stamp.json            what they were decoded from (checkpoint files, questions, every
                                                 decoding setting) and the .jsonl's sha256, written last: resume=true
                                                 reuses a cell whose stamp matches this run instead of decoding it
                                                 (another row's folder too: a renamed checkpoint row)
  table.md, table.json                           Table 1 style: one row per checkpoint, one column per metric; the
                                                 json also holds each row's settings (the engine that ran, its
                                                 dtype, the token limits), per cell the files it was scored
                                                 against ("sources": questions, golds, limit, prediction file) and
                                                 per task the generations the length limit cut and the answers
                                                 left empty. An out_dir with an earlier table is refused unless
                                                 overwrite=true or resume=true. Rewritten after each checkpoint,
                                                 titled "partial" until the last: a crash keeps the finished rows
  robustness.md, robustness.json                 the k and retriever sweeps, when sweep_k / sweep_retrievers
                                                 (one engine per checkpoint decodes the main setting and the
                                                 sweep's; the main setting once: its rows are copied in, and its
                                                 files are the main table's)
Every checkpoint, prediction file and question is checked before anything is decoded. One process (not torchrun):
for one GPU per checkpoint, run one process each (CUDA_VISIBLE_DEVICES=i python recipes/evaluate.py
checkpoints=name=folder out_dir=runs/eval/name ...), then put the rows side by side by scoring the prediction files
they wrote (predictions=name=runs/eval/name/predictions/name/LaMP_1_predictions.json,name=...).
Library use (the demo pipeline): `evaluate_checkpoints({"base": dir0, "sft": dir1}, tasks, data=...) -> EvalTable`.

1. config   2. task data   3. generation   4. scoring and tables   5. the command line
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from minitagpr.atomic import atomic_write_bytes, atomic_write_text
from minitagpr.cli import exit_on_user_error, is_user_error
from minitagpr.config import (ConfigError, check_at_least, check_choice, check_fraction, check_writable_dir,
                              check_writable_file, parse_cli)
from minitagpr.data import lamp, prompts, retrieval
from minitagpr.data.lamp import DataError, LampExample, not_a_file
from minitagpr.distributed import describe_machine, machine
from minitagpr.metrics import COLUMNS, evaluate, table_columns
from minitagpr.rollout.base import DivergedError, sample_base

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINITAGPR_SHARED", REPO.parent / "shared"))  # the shared assets beside the checkout
LAMP_TASKS = ["LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"]


# ----------------------------------------------------------------------------------------------- 1. config
@dataclass
class EvalConfig:
    checkpoints: list[str] = field(default_factory=list)  # "name=folder" (HF weights + tokenizer files), in order
    predictions: list[str] = field(default_factory=list)  # "name=file.json": official-format prediction files
    extract_answers: bool = False  # predictions hold raw responses: score what follows the last </think> (off:
    #                                as given, the official rules)
    data: str = "demo"  # LaMP tasks: "demo" (the seeded demo world) or the root folder of a LaMP download ("":
    #                     refused, as the paper configs leave it, so that a forgotten data= never scores the demo)
    data_dir: str = ""  # demo: a world already there is evaluated as built; else one is built there (default
    #                     out_dir/demo-world, ours: rebuilt when its parameters are out of date)
    pgraphrag_dir: str = ""  # PGraphRAG tasks: folder of amazon_dev.json, ... (default ../shared/data/pgraphrag;
    #                          $MINITAGPR_SHARED/data/pgraphrag when that variable is set)
    pgraphrag_domain: str = "amazon"  # amazon (the paper's AmazonReviewTitle) or hotel: reads
    #                                   <pgraphrag_dir>/<pgraphrag_domain>_<part>.json
    tasks: list[str] = field(default_factory=lambda: list(LAMP_TASKS))  # LaMP-1..5, LaMP-7 (from data) and/or
    #                                                                     PGraphRAG-title, PGraphRAG-rating
    split: str = "user"  # LaMP split: user | time (the demo world has user only; PGraphRAG ignores it)
    part: str = "dev"  # the part scored: dev | train (LaMP's test has no golds); PGraphRAG: dev | test
    limit: int = 0  # first `limit` questions per task (0 = all)
    retriever: str = "recency"  # recency | bm25 | bm25okapi | random (seeded by `seed`) | dense (needs dense_encoder)
    dense_encoder: str = ""  # retriever dense: a BERT-style encoder folder or hub id (safetensors), e.g. Contriever
    k: int = 8  # retrieved profile items per prompt (0 = none)
    sweep_k: list[int] = field(default_factory=list)  # robustness: these k with `retriever`
    sweep_retrievers: list[str] = field(default_factory=list)  # robustness: these retrievers with `k`
    max_prompt_tokens: int = 4096  # prompt budget: the least relevant profile items are dropped to fit; a question
    #                                that does not fit without any is refused before decoding (RL's budget)
    prompt_style: str = ""  # instruction style, "full" | "brief"; "" = the demo world's own style, else "full"
    max_new_tokens: int = 2048  # response cap in tokens, thinking included (table.json counts the cut ones); RL's
    #                             cap, so no answer the policy was trained to finish is cut here
    temperature: float = 0.0  # 0 = greedy decoding: evaluation numbers do not depend on a seed
    top_p: float = 1.0  # nucleus sampling, in (0, 1]
    seed: int = 0  # sampling (temperature > 0) and the random retriever
    batch_prompts: int = 16  # prompts per generate() call
    engine: str = "auto"  # auto (vllm when installed and a GPU is present, else builtin) | builtin | vllm; the
    #                       table's settings record the engine that ran
    # vLLM's share of the GPU (weights + KV cache). One engine is built per checkpoint, and an in-process vLLM engine
    # does not give all of its memory back when deleted (vllm-project/vllm#21073): 0.3 lets a few checkpoints run in
    # one process; a process that evaluates one checkpoint (CUDA_VISIBLE_DEVICES=i, one per GPU) can take 0.9
    vllm_gpu_memory_utilization: float = 0.3
    normalize: bool = False  # the project's per-task answer normalisation (off = official rules)
    out_dir: str = "runs/eval"  # predictions/, generations/, table.md/.json, robustness.md/.json (see the top)
    # an out_dir holding an earlier evaluation's table.json or robustness.json is refused unless overwrite=true,
    # which removes those tables first (the prediction and generation files of the rows decoded again are rewritten)
    overwrite: bool = False
    # reuse each (checkpoint, setting, task) cell an earlier run in out_dir decoded from the same checkpoint files
    # and questions with the same decoding settings (its stamp says so; under any row name), decode the rest, rebuild
    # the tables (so it also replaces them, as overwrite=true): a killed evaluation goes on where it stopped
    resume: bool = False

    def __post_init__(self):
        if not self.checkpoints and not self.predictions:
            raise ValueError("nothing to evaluate: give checkpoints=name=folder,... or predictions=name=file,...")
        for f in fields(self):  # names and paths go into the UTF-8 table: refuse what it cannot hold now, not
            value = getattr(self, f.name)  # after decoding (a path with a non-UTF-8 byte reads as a surrogate)
            for text in (value if isinstance(value, list) else [value]):
                if isinstance(text, str) and (why := lamp.surrogate_problem(text)):
                    raise ValueError(f"{f.name}: {text!r} {why} (not UTF-8 text; the table could not be written)")
        for key in ("checkpoints", "predictions"):
            for entry in getattr(self, key):
                if "=" not in entry:
                    raise ValueError(f"{key}: entry {entry!r} is not of the form name=path")
        repeated = [name for name, paths in named_entries(self.checkpoints).items() if len(paths) > 1]
        if repeated:  # one row per checkpoint name: a second path would silently replace the first
            raise ValueError(f"checkpoints: name(s) {', '.join(map(repr, repeated))} given more than once")
        clash = sorted(set(named_entries(self.predictions)) & set(named_entries(self.checkpoints)))
        if clash:  # one row would silently take the other's metrics
            raise ValueError(f"row name(s) {', '.join(map(repr, clash))} given to both checkpoints= and predictions=; "
                             f"give each row its own name")
        self.tasks = [lamp.canonical_task(t) for t in self.tasks]
        if not self.tasks:  # an empty table written with exit status 0
            raise ValueError(f"tasks= is empty; give some of {', '.join(LAMP_TASKS)}, PGraphRAG-title, "
                             f"PGraphRAG-rating")
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:  # checked now: the second pass would be decoded in full and then refused by the table
            raise ValueError(f"tasks: {', '.join(repeated)} listed more than once")
        if not self.data and any(t.startswith("LaMP-") for t in self.tasks):
            raise ValueError("data= is required for LaMP tasks: the root folder of a LaMP download "
                             "(or data=demo for the demo world)")
        if self.engine not in ("auto", "builtin", "vllm"):
            raise ValueError(f"engine must be auto, builtin or vllm, got {self.engine!r}")
        check_fraction("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization)
        for k in [self.k, *self.sweep_k]:
            if k < 0:
                raise ValueError(f"k must be >= 0, got {k}")
        # checked now, not after the data and the model have loaded (or, for limit < 0, never: a silent subset)
        check_at_least("limit", self.limit, 0)
        for key in ("batch_prompts", "max_new_tokens", "max_prompt_tokens"):
            check_at_least(key, getattr(self, key), 1)
        check_at_least("temperature", self.temperature, 0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_choice("split", self.split, lamp.SPLITS)
        check_choice("part", self.part, lamp.PARTS)
        if self.data == "demo" and self.split != "user" and any(t in LAMP_TASKS for t in self.tasks):
            raise ValueError(f"split={self.split!r}: the demo world has the user split only (split=user)")
        check_choice("retriever", self.retriever, retrieval.RETRIEVERS)
        for name in self.sweep_retrievers:
            check_choice("sweep_retrievers", name, retrieval.RETRIEVERS)
        if (self.sweep_k or self.sweep_retrievers) and not self.checkpoints:  # prediction files have one setting
            raise ValueError("sweep_k / sweep_retrievers decode checkpoints again under other settings: give "
                             "checkpoints= (prediction files are scored as they are, under the setting they were "
                             "made with)")
        if "dense" in (self.retriever, *self.sweep_retrievers) and not self.dense_encoder:
            raise ValueError("retriever dense needs dense_encoder=<encoder folder or hub id> (e.g. Contriever in "
                             "safetensors: minitagpr.model.encoder)")
        check_choice("prompt_style", self.prompt_style, ("", *prompts.STYLES))


def _world_style(data: Any, data_dir, tasks: Sequence[str]) -> str:
    """The instruction style the demo world's SFT chains use when some task is read from the demo world (a demo
    model only knows that style, so it then applies to every task of the run); "full" otherwise. PGraphRAG tasks
    never come from the demo world."""
    if data != "demo" or all(lamp.canonical_task(t).startswith("PGraphRAG") for t in tasks):
        return "full"
    from minitagpr.data import demo_world
    return demo_world.DemoWorld.load(Path(data_dir)).params.get("prompt_style", "full")


def named_entries(entries: Sequence[str]) -> dict[str, list[str]]:
    """["a=x", "b=y", "a=z"] -> {"a": ["x", "z"], "b": ["y"]}, keeping first-seen order of names."""
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, _, path = entry.partition("=")
        out.setdefault(name.strip(), []).append(path.strip())
    return out


# ----------------------------------------------------------------------------------------------- 2. task data
@dataclass
class TaskData:
    task: str
    examples: list[LampExample]
    golds: dict[str, str]
    source: str  # the questions file, for the report
    gold_file: str = ""  # the outputs file (PGraphRAG: the source file), for error messages
    limit: int = 0  # the limit that cut `examples` to their first `limit` (0: all)


def load_task_data(data: Any, task: str, *, split: str = "user", part: str = "dev", limit: int = 0,
                   data_dir: str | os.PathLike | None = None, pgraphrag_dir: str | os.PathLike | None = None,
                   pgraphrag_domain: str = "amazon") -> TaskData:
    """Questions and golds of one task.

    LaMP tasks come from `data`: the root folder of a LaMP download, "demo" (the demo world, built under data_dir),
    a DemoWorld, or a mapping {task: (questions_path, outputs_path)}. PGraphRAG tasks are built from
    `<pgraphrag_dir>/<domain>_<part>.json` (default ../shared/data/pgraphrag, domain amazon: the paper's
    AmazonReviewTitle) unless the mapping names files for them."""
    task = lamp.canonical_task(task)
    if task.startswith("PGraphRAG") and not (isinstance(data, Mapping) and task in data):
        from minitagpr.data import pgraphrag

        folder = Path(pgraphrag_dir) if pgraphrag_dir else SHARED / "data" / "pgraphrag"
        source = folder / f"{pgraphrag_domain}_{part}.json"
        if not source.is_file():  # say which key picks the file, not only that it is missing
            raise DataError(f"{source}: {not_a_file(source)} ({task} reads <pgraphrag_dir>/<pgraphrag_domain>_<part>.json; "
                            f"set pgraphrag_dir= to the folder that holds {source.name})")
        examples, golds = pgraphrag.make_task(source, task)
        gold_file = source
    else:
        questions, outputs = _task_files(data, task, split, part, data_dir)
        _, golds = lamp.load_outputs(outputs, task)  # checks the file's task and that every gold is an answer
        examples = lamp.load_questions(questions, task)
        source, gold_file = questions, outputs
    if not examples:  # e.g. a PGraphRAG file in which no user has two reviews
        raise DataError(f"{source}: no {task} examples")
    lamp.check_no_extra_golds(golds, examples, gold_file)  # the whole file, before `limit` picks a subset
    if limit:
        examples = examples[:limit]
    missing = [ex.id for ex in examples if ex.id not in golds]
    if missing:  # the outputs file lacks them (the questions file only asks)
        raise DataError(f"{gold_file}: no gold output for question id(s) {', '.join(map(repr, missing[:10]))}"
                        f"{' ...' if len(missing) > 10 else ''} of {source}")
    return TaskData(task, examples, {ex.id: golds[ex.id] for ex in examples}, str(source), str(gold_file), limit)


def _task_files(data, task, split, part, data_dir) -> tuple[Path, Path]:
    if isinstance(data, Mapping):
        if task not in data:
            raise DataError(f"no files given for task {task}; the data mapping has {', '.join(data)}")
        q, o = data[task]
        return Path(q), Path(o)
    if hasattr(data, "task_files"):  # a DemoWorld
        return tuple(Path(p) for p in data.task_files(task, part))  # type: ignore[return-value]
    if data == "demo":
        from minitagpr.data import demo_world

        return _task_files(demo_world.build(data_dir or "runs/eval/demo-world"), task, split, part, data_dir)
    return lamp.split_files(data, task, split, part)


# ----------------------------------------------------------------------------------------------- 3. generation
VLLM_DTYPE = "bfloat16"  # what vLLM decodes in (the built-in engine: fp32, see make_engine)


def make_engine(checkpoint: str | os.PathLike, kind: str = "auto", max_batch_rows: int = 64,
                max_model_len: int = 4096, *, gpu_memory_utilization: float = 0.3, load: bool = True):
    """(engine, tokenizer) for a checkpoint folder: vLLM on GPUs when installed, else the built-in engine.
    load=False makes the checks a load starts with (the folder, config.json, the weights' headers, the tokenizer
    files) without reading any weight, and returns (None, tokenizer)."""
    from minitagpr.model import Qwen3Config, load_pretrained
    from minitagpr.model.checkpoint import resolve_checkpoint, tensor_names
    from minitagpr.rollout import BuiltinEngine, VLLMEngine, resolve_engine
    from minitagpr.tokenizer import Tokenizer

    folder = resolve_checkpoint(checkpoint)
    tokenizer = Tokenizer.from_dir(folder)
    if not load:
        Qwen3Config.from_json(folder / "config.json")
        tensor_names(folder)  # every shard's header (a missing shard, a truncated file), no tensor read
        return None, tokenizer
    kind = resolve_engine(kind)
    if kind == "vllm":
        return VLLMEngine(folder, tokenizer, sleep_level=0, max_model_len=max_model_len, dtype=VLLM_DTYPE,
                          gpu_memory_utilization=gpu_memory_utilization), tokenizer
    # fp32 on every device, like the RL rollouts and SFT's held-out check: bf16 logits make greedy ties (lowest id
    # wins), so a GPU table would not reproduce the CPU one
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pretrained(folder, dtype=torch.float32, device=device).eval()
    return BuiltinEngine(model, tokenizer, max_batch_rows=max_batch_rows), tokenizer


def engine_settings(engine) -> dict[str, Any]:
    """What a table records of the engine that decoded a row: which one ran (engine=auto resolved) and its dtype."""
    from minitagpr.rollout import BuiltinEngine, VLLMEngine

    if isinstance(engine, VLLMEngine):
        return {"engine": "vllm", "dtype": VLLM_DTYPE}
    if isinstance(engine, BuiltinEngine):
        return {"engine": "builtin", "dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch.")}
    return {"engine": type(engine).__name__, "dtype": None}  # an engine injected by a test


def input_problems(named_checkpoints: Mapping[str, str | os.PathLike], tasks: Sequence[TaskData], *,
                   max_prompt_tokens: int, prompt_style: str) -> list[str]:
    """Everything decoding will need, checked before any of it, one message per problem: each checkpoint as
    `make_engine(load=False)` checks it, and every question against max_prompt_tokens with each distinct tokenizer
    (`long_questions`)."""
    from minitagpr.tokenizer import CONFIG_FILE, TOKENIZER_FILE

    problems, tokenizers = [], {}
    for name, checkpoint in named_checkpoints.items():
        try:
            _, tokenizer = make_engine(checkpoint, load=False)
        except Exception as err:
            if not is_user_error(err):
                raise  # a bug, not a bad checkpoint
            problems.append(f"checkpoints={name}: {err}")
            continue
        if tokenizer is not None:  # None: a make_engine injected by a test
            same_files = tuple((Path(tokenizer.source) / f).read_bytes() for f in (TOKENIZER_FILE, CONFIG_FILE))
            tokenizers.setdefault(same_files, tokenizer)  # a fine-tune's copy of its base's tokenizer counts once
            if mismatch := prompts.style_mismatch(tokenizer.source, prompt_style, use="evaluated"):  # its folder
                problems.append(f"checkpoints={name}: {mismatch}")
    for tokenizer in tokenizers.values():
        found = long_questions(tokenizer, tasks, max_prompt_tokens, prompt_style)
        if found:
            shown = ", ".join(f"{task} id {i!r} ({n} tokens)" for task, i, n in found[:5])
            problems.append(f"{len(found)} question(s) need more than max_prompt_tokens={max_prompt_tokens} tokens "
                            f"without any profile item: {shown}{' ...' if len(found) > 5 else ''}; a question is "
                            f"never cut, so raise max_prompt_tokens to at least {max(n for _, _, n in found)}")
    return problems


def long_questions(tokenizer, tasks: Sequence[TaskData], max_prompt_tokens: int,
                   prompt_style: str) -> list[tuple[str, str, int]]:
    """(task, example id, prompt tokens) of every example whose prompt is over max_prompt_tokens even without profile
    items. Exactly the prompts `prompts.fit_messages` refuses, whatever the retriever and k: it drops profile items
    until the prompt fits but never cuts the question. One tokenizer pass per example: seconds for a LaMP dev set."""
    found = []
    for td in tasks:
        bare = [tokenizer.render_chat(prompts.build_messages(ex, [], style=prompt_style), add_generation_prompt=True)
                for ex in td.examples]
        for ex, ids in zip(td.examples, tokenizer.encode_batch(bare)):  # apply_chat's ids, in one parallel call
            if len(ids) > max_prompt_tokens:
                found.append((td.task, ex.id, len(ids)))
    return found


def make_retriever(name: str, seed: int = 0, dense_encoder: str | os.PathLike | None = None) -> retrieval.Retriever:
    """A built-in retriever by name; "dense" loads `dense_encoder` (minitagpr.model.encoder: Contriever's mean-pooled
    BERT, dot-product scores as LaMP's reference ranker) once, on CUDA when available."""
    if name != "dense":
        return retrieval.get_retriever(name, seed=seed)
    if not dense_encoder:
        raise ValueError("retriever dense needs dense_encoder=<encoder folder or hub id>")
    from minitagpr.model.encoder import encoder_fn
    return retrieval.get_retriever("dense", encode_fn=encoder_fn(dense_encoder))


def generate_answers(engine, tokenizer, data: TaskData, *, retriever: str | retrieval.Retriever = "recency",
                     k: int = 8, max_prompt_tokens: int = 4096, max_new_tokens: int = 2048, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, batch_prompts: int = 16,
                     prompt_style: str = "full") -> list[dict]:
    """One generation record per example: {id, text, finish_reason, profile_items (in the prompt),
    profile_items_retrieved (min(k, profile size); more than profile_items when max_prompt_tokens left some out),
    prompt_tokens, completion_tokens}; `text` is the raw continuation (thinking included). `prompt_style`: the instruction the
    model was trained with (minitagpr.data.prompts; the demo world uses "brief")."""
    chooser = retrieval.get_retriever(retriever, seed=seed) if isinstance(retriever, str) else retriever
    stops = tokenizer.stop_ids
    records = []
    for start in range(0, len(data.examples), batch_prompts):
        batch = data.examples[start:start + batch_prompts]
        ids, kept = [], []
        for ex in batch:
            items = chooser.select(ex, k)
            messages, n_items = prompts.fit_messages(ex, items, tokenizer, max_prompt_tokens, style=prompt_style)
            ids.append(tokenizer.apply_chat(messages, add_generation_prompt=True))
            kept.append((n_items, len(items)))
        groups = engine.generate(ids, n=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                 stop_token_ids=stops,  # each example seeded by its place in the file, not the batch
                                 seed=[sample_base(seed, start + i) for i in range(len(batch))])
        for ex, prompt, (n_items, n_retrieved), group in zip(batch, ids, kept, groups):
            c = group[0]
            records.append({"id": ex.id, "text": c.text, "finish_reason": c.finish_reason, "profile_items": n_items,
                            "profile_items_retrieved": n_retrieved, "prompt_tokens": len(prompt),
                            "completion_tokens": len(c.token_ids)})
    return records


# ----------------------------------------------------------------------------------------------- 4. scoring, tables
def score(data: TaskData, texts: Mapping[str, str], *, extract: bool = True, normalize: bool = False) -> dict:
    """Official-rule metrics of raw texts (answer after the last `</think>` when `extract`)."""
    return evaluate(data.task, dict(texts), data.golds, extract=extract, normalize=normalize)


def generation_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many generations the length limit cut (finish_reason "length") and how many left no answer (nothing after
    the last </think>, or a <think> never closed): both score as wrong, so a table says how many there were. Also how
    many pass the RL stages' format gate (R_f = 1: a well-formed chain and answer, not cut) and tag check (R_tag = 0:
    tag syntax, only the nine tags, at least three; minitagpr.rewards), which the task metrics do not show, and how
    many prompts held fewer profile items than were retrieved (max_prompt_tokens left some out: a row labelled k=32
    may have read fewer)."""
    from minitagpr import rewards
    from minitagpr.data import answers

    return {"generations": len(records),
            "cut_by_length": sum(r.get("finish_reason") == "length" for r in records),
            "no_answer": sum(not answers.extract_answer(r["text"]) for r in records),
            "format_ok": sum(r.get("finish_reason") != "length" and rewards.format_reward(r["text"]) == 1.0
                             for r in records),  # cut -> R_f = 0, as rewards.score_batch scores it
            "tags_ok": sum(rewards.tag_reward(rewards.split_response(r["text"])[0]) == 0.0 for r in records),
            "profile_cut": sum(r.get("profile_items", 0) < r.get("profile_items_retrieved", 0) for r in records)}


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    text = f"{value:.3f}"
    return text[1:] if text.startswith("0.") else text  # the paper's style: .717


@dataclass
class EvalTable:
    """Rows of {task: metrics}, one per evaluated model and setting, with how each was produced."""

    rows: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)  # task -> number of scored examples
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # decoded rows: generation_counts
    notes: list[str] = field(default_factory=list)  # lines printed under the table (e.g. what a reference row is)
    machine: dict[str, Any] = field(default_factory=dict)  # where the rows were decoded (distributed.machine)
    # row -> task -> the files behind that cell: questions, golds, limit, and for a prediction file its path and
    # how its answers were written (its "minitagpr" note)
    sources: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def add(self, row: str, task: str, metrics: Mapping[str, float], settings: Mapping[str, Any], n: int,
            counts: Mapping[str, int] | None = None, source: Mapping[str, Any] | None = None) -> None:
        if task in self.rows.get(row, {}):  # e.g. two prediction files of one row for one task: which one counts?
            raise DataError(f"row {row!r} already has {task} results (from "
                            f"{self.sources.get(row, {}).get(task) or self.settings[row]}); give each task of a row "
                            f"one file or checkpoint")
        slug_clash = [r for r in self.rows if r != row and _slug(r) == _slug(row)]
        if slug_clash:  # both rows would write to the same predictions/ and generations/ folder
            raise DataError(f"rows {slug_clash[0]!r} and {row!r} share the output folder name {_slug(row)!r}; "
                            f"rename one of them")
        self.rows.setdefault(row, {})[task] = dict(metrics)
        self.settings.setdefault(row, dict(settings))
        self.examples[task] = n
        if counts is not None:
            self.counts.setdefault(row, {})[task] = dict(counts)
        if source is not None:
            self.sources.setdefault(row, {})[task] = dict(source)

    def tasks(self) -> list[str]:
        seen = {t for r in self.rows.values() for t in r}
        ordered = [t for t in dict.fromkeys(t for t, _, _ in COLUMNS) if t in seen]
        return ordered + sorted(seen - set(ordered))

    def markdown(self, title: str = "") -> str:
        """Table 1 layout: metric columns in the paper's order; '—' where a row lacks a task. With decoded rows, a
        last column "cut": their generations stopped by max_new_tokens, summed over the tasks."""
        tasks = self.tasks()
        cols = table_columns(tasks)  # a task without columns is an error, never a silently missing block
        heads = [h for _, _, h in cols] + (["cut"] if self.counts else [])
        lines = [f"### {title}", ""] if title else []
        lines += ["| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for name, results in self.rows.items():
            cells = [_fmt(results.get(t, {}).get(key)) for t, key, _ in cols]
            if self.counts:
                cut = [c["cut_by_length"] for c in self.counts.get(name, {}).values()]
                cells.append(str(sum(cut)) if cut else "—")  # "—": a prediction file, nothing decoded here
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        counts = ", ".join(f"{t}: {n}" for t, n in self.examples.items())
        lines += ["", f"Examples per task: {counts}. Lower is better for MAE/RMSE, higher for the rest."]
        if self.counts:
            lines.append("cut: generations that reached max_new_tokens (scored as generated; per task, with the "
                         "answers left empty, in the .json).")
        lines += self.notes
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"rows": self.rows, "settings": self.settings, "sources": self.sources, "examples": self.examples,
                "counts": self.counts, "notes": self.notes, "machine": self.machine}

    def write(self, out_dir: str | os.PathLike, stem: str = "table", title: str = "") -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        md = atomic_write_text(out_dir / f"{stem}.md", self.markdown(title))
        js = atomic_write_text(out_dir / f"{stem}.json", json.dumps(self.to_json(), indent=2) + "\n")
        return md, js


def task_source(td: TaskData) -> dict[str, Any]:
    """The files a task's cell was scored against (table.json `sources`): they name the data, split, part or
    PGraphRAG domain."""
    return {"questions": td.source, "golds": td.gold_file, "limit": td.limit, "examples": len(td.examples)}


def cell_notes(table: EvalTable, row: str, task: str) -> list[str]:
    """The notes `evaluate_checkpoints` wrote about one cell (they start "<row> <task>: ")."""
    return [n for n in table.notes if n.startswith(f"{row} {task}: ")]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "row"


def predictions_file(out_dir: str | os.PathLike, row: str, task: str) -> Path:
    """Where one row's official-format predictions for a task go: predictions/<row>/<LaMP_k>_predictions.json."""
    return Path(out_dir) / "predictions" / _slug(row) / f"{lamp.task_spec(task).file_name}_predictions.json"


def _write_outputs(out_dir: Path | None, row: str, data: TaskData, records: list[dict],
                   normalize: bool = False, stamp: Mapping[str, Any] | None = None) -> None:
    """Official-format predictions and the raw generations of one row and task. The predictions are the answers as
    scored (extracted, and normalised when the table was), so re-scoring the file under the official rules gives
    the table's numbers. `stamp` (a freshly decoded cell): what the generations came from, written after them with
    their sha256 (`reusable_generations`); without it (a reused cell) the generations are on disk already."""
    if out_dir is None:
        return
    from minitagpr.data import answers

    preds = {r["id"]: answers.normalize(data.task, answers.extract_answer(r["text"]), normalize) for r in records}
    lamp.write_outputs(predictions_file(out_dir, row, data.task), data.task, preds,
                       note={"normalize": normalize, "extract_answers": True})  # re-scored later, it says so
    if stamp is None:
        return
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    folder = out_dir / "generations" / _slug(row)
    atomic_write_bytes(folder / f"{data.task}.jsonl", lines)
    # last: a kill between the two leaves an older stamp whose sha256 does not match the new file (not reused)
    atomic_write_text(folder / f"{data.task}.stamp.json",
                      json.dumps({**stamp, "sha256": hashlib.sha256(lines).hexdigest()}, indent=1) + "\n")


def _row_name(name: str, retriever: str, k: int, settings: Sequence[tuple[str, int]], label_settings: bool | None,
              bare_setting: tuple[str, int] | None) -> str:
    """A table row's name: the checkpoint's, with " [retriever k=K]" when settings are labelled
    (evaluate_checkpoints)."""
    labelled = (len(settings) > 1 if label_settings is None else label_settings) and (retriever, k) != bare_setting
    return f"{name} [{retriever} k={k}]" if labelled else name


def check_cell_outputs(out_dir: Path, rows: Iterable[str], tasks: Sequence[str]) -> None:
    """ConfigError naming every file a cell will write (predictions, generations, stamp) that a folder occupies
    or whose folder cannot be written: found before decoding, not after it. Creates the row folders."""
    problems = []
    for row in dict.fromkeys(rows):
        for task in tasks:
            for path in (predictions_file(out_dir, row, task), out_dir / "generations" / _slug(row) / f"{task}.jsonl",
                         out_dir / "generations" / _slug(row) / f"{task}.stamp.json"):
                try:
                    check_writable_file(path, "out_dir")
                except ConfigError as err:
                    problems.append(str(err))
    if problems:
        raise ConfigError(" | ".join(dict.fromkeys(problems)))


STAMP_FORMAT = "minitagpr-eval-cell/1"


def checkpoint_fingerprint(checkpoint: str | os.PathLike) -> dict:
    """What identifies a checkpoint's contents for resume: the folder it resolves to (`~` expanded; a hub id's cached
    snapshot, whose path holds the revision) and `files_digest` of its files (a re-export under the same path
    changes it; the weights are read only at their edges)."""
    from minitagpr.model.checkpoint import CheckpointError, files_digest, resolve_checkpoint
    try:
        folder = resolve_checkpoint(checkpoint)
    except CheckpointError:  # not a folder or a hub id: an engine injected by a test (a real one fails to load)
        return {"id": str(checkpoint)}
    return {"folder": str(folder.resolve()), "digest": files_digest(folder)}


def examples_digest(data: TaskData) -> str:
    """sha256 of the questions a cell decodes (ids, inputs and profiles, in order): another file, limit or part
    gives another digest."""
    h = hashlib.sha256()
    for ex in data.examples:
        h.update(json.dumps([ex.id, ex.input, ex.profile], sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def reusable_generations(out_dir: Path | None, row: str, data: TaskData, key: Mapping[str, Any],
                         log=None) -> tuple[list[dict], dict] | None:
    """(records, stamp) of a cell an earlier run decoded under exactly `key` (checkpoint files, questions, retriever,
    k, every decoding setting), when its stamp says so and the generations file is the one stamped; None otherwise
    (missing, other settings, or a file changed since: decoded again; `log` is told why, when there was a stamp).
    The stamp's "used" is the engine that ran, its "machine" where."""
    if out_dir is None:
        return None
    folder = out_dir / "generations" / _slug(row)
    stamp_file, gen_file = folder / f"{data.task}.stamp.json", folder / f"{data.task}.jsonl"
    if not stamp_file.exists():
        return None  # never finished here: nothing to say

    def no(why: str) -> None:
        if log is not None:
            log(f"eval {row} {data.task}: not reused ({why}); decoding it again")
    try:
        stamp = json.loads(stamp_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return no(f"{type(err).__name__} reading {stamp_file.name}")
    want = json.loads(json.dumps(key))
    if not isinstance(stamp, dict) or not isinstance(stamp.get("key"), dict):
        return no(f"{stamp_file} is not a stamp")
    if stamp["key"] != want:  # checked before the generations are read: a resume looks at every row's stamps
        changed = [f"{k} {stamp['key'].get(k)!r} -> {want.get(k)!r}" if k not in ("checkpoint_files", "examples",
                                                                                  "dense_encoder") else f"{k} changed"
                   for k in sorted(want.keys() | stamp["key"].keys()) if stamp["key"].get(k) != want.get(k)]
        return no("; ".join(changed))
    try:
        raw = gen_file.read_bytes()
    except OSError as err:
        return no(f"{type(err).__name__} reading {gen_file.name}")
    if stamp.get("sha256") != hashlib.sha256(raw).hexdigest():
        return no(f"{gen_file} changed since it was stamped")
    try:  # split on "\n" alone: a generation may hold U+2028, U+0085 ..., which str.splitlines also breaks at
        records = [json.loads(line) for line in raw.decode("utf-8").split("\n") if line.strip()]
    except ValueError as err:
        return no(f"{gen_file} is not JSONL ({err})")
    if not all(isinstance(r, dict) for r in records):
        return no(f"{gen_file} holds a line that is no JSON object")
    if [r.get("id") for r in records] != [ex.id for ex in data.examples]:  # the digest makes this a safeguard
        return no(f"{gen_file} holds other question ids")
    return records, stamp


def reusable_elsewhere(out_dir: Path | None, row: str, data: TaskData, key: Mapping[str, Any]):
    """(folder, (records, stamp)) of a cell stamped under exactly `key` in another row's folder: the same checkpoint
    files and settings under another row name (checkpoints=A=dir renamed to B=dir); (None, None) when no row holds
    one. `reusable_generations` reads a folder's generations only when its stamp's key matches."""
    root = out_dir / "generations" if out_dir is not None else None
    folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root is not None and root.is_dir() else []
    for folder in folders:
        found = reusable_generations(out_dir, folder, data, key) if folder != _slug(row) else None  # slugs already
        if found is not None:
            return folder, found
    return None, None


def evaluate_checkpoints(named_checkpoints: Mapping[str, str | os.PathLike], tasks: Sequence[str] | Sequence[TaskData],
                         *, data: Any = "demo", data_dir=None, pgraphrag_dir=None, pgraphrag_domain: str = "amazon",
                         split: str = "user", part: str = "dev", limit: int = 0,
                         settings: Sequence[tuple[str, int]] = (("recency", 8),),
                         max_prompt_tokens: int = 4096, max_new_tokens: int = 2048, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int = 0, batch_prompts: int = 16, engine: str = "auto",
                         vllm_gpu_memory_utilization: float = 0.3,
                         normalize: bool = False, out_dir: str | os.PathLike | None = None,
                         log=print, prompt_style: str = "full", label_settings: bool | None = None,
                         dense_encoder: str | os.PathLike | None = None,
                         retrievers: Mapping[str, retrieval.Retriever] | None = None,
                         checked: bool = False, bare_setting: tuple[str, int] | None = None,
                         after_checkpoint=None, resume: bool = False) -> EvalTable:
    """Run every checkpoint on every task under every (retriever, k) in `settings`; returns the table (and writes
    predictions + generations under out_dir when given). Rows are named after the checkpoints, with
    " [retriever k=K]" appended when `label_settings` (default: when there is more than one setting; a sweep
    passes True, so that even a one-setting sweep never writes over the main table's files); `bare_setting`'s rows
    keep the bare name even so (run(): the main table's setting, decoded with the sweep's by the same engine).
    `tasks` are task names (loaded from `data`) or ready TaskData. `retrievers`: ready ones by name (else built
    here). Every checkpoint and question is checked first (`input_problems`) unless the caller did (`checked`).
    `after_checkpoint(table)`, when given, sees the table so far after each checkpoint (run() writes it).
    `resume`: a cell whose generations an earlier run stamped under this run's settings is read back, not decoded
    (`reusable_generations`; under another row name too, `reusable_elsewhere`); a checkpoint whose cells are all
    reused is never loaded."""
    task_data = [t if isinstance(t, TaskData) else load_task_data(data, t, split=split, part=part, limit=limit,
                                                                   data_dir=data_dir, pgraphrag_dir=pgraphrag_dir,
                                                                   pgraphrag_domain=pgraphrag_domain)
                 for t in tasks]
    if not checked:  # a bad last checkpoint or one over-long question must not cost the decoding before it
        problems = input_problems(named_checkpoints, task_data, max_prompt_tokens=max_prompt_tokens,
                                  prompt_style=prompt_style)
        if problems:
            raise DataError(" | ".join(problems))
    out = Path(out_dir) if out_dir is not None else None
    rows = {(name, r, k): _row_name(name, r, k, settings, label_settings, bare_setting)
            for name in named_checkpoints for r, k in settings}
    if out is not None:  # a folder (or file) in the way of a cell's files must not cost the decoding before it
        check_cell_outputs(out, rows.values(), [td.task for td in task_data])
    ready = dict(retrievers or {})
    choosers = {r: ready[r] if r in ready else make_retriever(r, seed, dense_encoder)
                for r in dict.fromkeys(r for r, _ in settings)}
    from minitagpr.rollout import resolve_engine
    table = EvalTable(machine=machine())
    digests = {td.task: examples_digest(td) for td in task_data} if out is not None else {}
    encoder = checkpoint_fingerprint(dense_encoder) if dense_encoder and out is not None else None
    for name, checkpoint in named_checkpoints.items():
        eng = tokenizer = used = None
        loaded = False  # the engine is built at this checkpoint's first cell that is not reused
        files = checkpoint_fingerprint(checkpoint) if out is not None else None
        for retriever, k in settings:
            row = rows[name, retriever, k]
            for td in task_data:
                # everything the generations depend on (batch_prompts does not: each example is seeded by its place)
                key = {"format": STAMP_FORMAT, "checkpoint": str(checkpoint), "checkpoint_files": files,
                       "engine": resolve_engine(engine), "task": td.task, "examples": digests.get(td.task),
                       "retriever": retriever, "k": k,
                       "dense_encoder": encoder if retriever == "dense" else None,
                       "prompt_style": prompt_style, "max_prompt_tokens": max_prompt_tokens,
                       "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                       # the seed reaches only sampling and the random retriever: greedy cells ignore it
                       "seed": seed if temperature > 0 or retriever == "random" else None}
                why_not: list[str] = []  # why the row's own stamp does not match: said only if no other row's does
                found = reusable_generations(out, row, td, key, why_not.append) if resume else None
                origin = None  # another row's folder the cell is reused from
                if found is None and resume:
                    origin, found = reusable_elsewhere(out, row, td, key)
                    for line in why_not if found is None else ():
                        log(line)
                if found is not None:
                    records, stamp = found
                    cell_used = dict(stamp.get("used") or {})
                    log(f"eval {row} {td.task}: reusing the stamped generations"
                        + (f" of generations/{origin}/ (the same checkpoint files and settings)" if origin else "")
                        + " (resume=true)")
                    if stamp.get("machine") != table.machine:  # the table's machine is this run's: say so
                        table.notes.append(f"{row} {td.task}: generations decoded by an earlier run on "
                                           f"{describe_machine(stamp.get('machine') or {})} (resume=true)")
                else:
                    if not loaded:
                        loaded = True
                        eng, tokenizer = make_engine(checkpoint, engine,
                                                     max_model_len=max_prompt_tokens + max_new_tokens,
                                                     gpu_memory_utilization=vllm_gpu_memory_utilization)
                        used = engine_settings(eng)  # engine=auto may have fallen back to the fp32 built-in engine
                        log(f"eval {name}: {used['engine']} engine, {used['dtype']}")
                    try:
                        records = generate_answers(eng, tokenizer, td, retriever=choosers[retriever], k=k,
                                                   max_prompt_tokens=max_prompt_tokens,
                                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                                   top_p=top_p, seed=seed, batch_prompts=batch_prompts,
                                                   prompt_style=prompt_style)
                    except DivergedError as err:  # non-finite logits: name the model and task, not a batch index
                        raise DivergedError(f"checkpoints={name} ({checkpoint}), {td.task}: {err} (do its weights "
                                            f"hold NaN or Inf?)") from None
                    cell_used = used
                metrics = score(td, {r["id"]: r["text"] for r in records}, normalize=normalize)
                table.add(row, td.task, metrics,
                          {"checkpoint": str(checkpoint), **cell_used, "retriever": retriever, "k": k,
                           "prompt_style": prompt_style, "max_prompt_tokens": max_prompt_tokens,
                           "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                           "normalize": normalize},
                          len(td.examples), counts=generation_counts(records), source={**task_source(td), **(
                              {} if out is None else  # relative to table.json's folder: the run may move
                              {"predictions": str(predictions_file(out, row, td.task).relative_to(out))})})
                # a fresh cell, or one reused from another row's folder, gets its generations and stamp in this row's
                _write_outputs(out, row, td, records, normalize, stamp=None if found is not None and not origin else
                               {"key": key, "used": cell_used,
                                "machine": stamp.get("machine") if origin else table.machine})
                log(f"eval {row} {td.task}: " + ", ".join(f"{m}={v:.4f}" for m, v in metrics.items()))
                if short := table.counts[row][td.task]["profile_cut"]:
                    log(f"eval {row} {td.task}: note: {short} of {len(records)} prompts held fewer than the "
                        f"retrieved profile items (max_prompt_tokens={max_prompt_tokens} left some out)")
        del eng
        gc.collect()  # the next checkpoint's engine needs this one's GPU memory (vLLM takes a share of the whole GPU)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if after_checkpoint is not None:
            after_checkpoint(table)
    return table


def evaluate_prediction_files(named_files: Mapping[str, Sequence[str | os.PathLike]], tasks: Sequence[TaskData], *,
                              normalize: bool = False, extract: bool = False) -> EvalTable:
    """Score official-format prediction files; each file names its task (`"task": "LaMP_k"`). Their outputs are
    scored as given, as the official evaluation does; `extract=True` first takes the answer after the last
    `</think>` of each (for files of raw model responses)."""
    by_task = {td.task: td for td in tasks}
    table = EvalTable()
    problems = []
    for name, files in named_files.items():
        for path in files:
            try:
                # written: the file's "minitagpr" note, e.g. answers normalised when a decoded row wrote it
                task, metrics, written = _score_prediction_file(path, by_task, normalize=normalize, extract=extract)
                table.add(name, task, metrics, {"normalize": normalize, "extract_answers": extract},
                          len(by_task[task].examples),
                          source={"predictions": str(path), **task_source(by_task[task]),
                                  **({"written_with": written} if written else {})})
                if written.get("normalize") and not normalize:
                    table.notes.append(f"{name} {task}: {path} holds answers normalised when they were written "
                                       f"(normalize=true), scored here as given")
            except DataError as err:  # every bad file in one message, not one per run
                problems.append(str(err))
    if problems:
        raise DataError(" | ".join(problems))
    return table


def _score_prediction_file(path, by_task: Mapping[str, TaskData], *, normalize: bool,
                           extract: bool) -> tuple[str, dict, dict]:
    file_task, preds, note = lamp.read_outputs(path)
    task = lamp.canonical_task(file_task)
    if task not in by_task:
        raise DataError(f"{path}: predictions for {task}, which is not among the evaluated tasks "
                        f"({', '.join(by_task)})")
    td = by_task[task]
    try:
        return task, score(td, preds, extract=extract, normalize=normalize), note
    except DataError as err:  # ids that do not match the golds: name both files, and the limit that cut them
        cut = f"; limit={td.limit} keeps only the first {td.limit} question(s)" if td.limit else ""
        raise DataError(f"{path}: {str(err).removeprefix('evaluate: ')} "
                        f"(golds: {td.gold_file or td.source}{cut})") from None


# ----------------------------------------------------------------------------------------------- 5. command line
def run(cfg: EvalConfig) -> dict[str, EvalTable]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # no rank splits the work: each would decode every checkpoint and write the same files
        raise ConfigError(f"evaluate runs as one process, not under torchrun (WORLD_SIZE={world}); for one GPU per "
                          f"checkpoint run one process each, e.g. CUDA_VISIBLE_DEVICES=0 python recipes/evaluate.py "
                          f"... checkpoints=sft=FOLDER out_dir=runs/eval/sft, then put the rows side by side by "
                          f"scoring the prediction files they wrote: python recipes/evaluate.py ... "
                          f"predictions=sft=runs/eval/sft/predictions/sft/LaMP_1_predictions.json,sft=...")
    out = Path(cfg.out_dir)
    if cfg.checkpoints:
        from minitagpr.rollout import require_vllm, resolve_engine
        if resolve_engine(cfg.engine) == "vllm":  # engine=auto too: it is vllm whenever vllm and a GPU are here
            require_vllm(cfg.temperature)
    check_writable_dir(out, "out_dir")  # now, not after the first generations, which would then be lost
    earlier = [out / f"{stem}.{ext}" for stem in ("table", "robustness") for ext in ("json", "md")
               if (out / f"{stem}.{ext}").exists()]
    if earlier and not (cfg.overwrite or cfg.resume):  # a quick limit=50 rerun must not replace Table 1 unasked
        raise ConfigError(f"out_dir={out} holds an earlier evaluation ({', '.join(p.name for p in earlier)}); give "
                          f"another out_dir=, overwrite=true, or resume=true (reuses what it decoded under the same "
                          f"settings)")
    data_dir = cfg.data_dir or (out / "demo-world" if cfg.data == "demo" else None)
    data: Any = cfg.data
    if cfg.data == "demo" and cfg.data_dir and (Path(cfg.data_dir) / "world.json").exists():
        # a world the user points at is evaluated as it is: building with the default parameters would replace one
        # built with others (the default out_dir/demo-world is ours, rebuilt when its parameters are out of date)
        from minitagpr.data import demo_world
        data = demo_world.DemoWorld.load(cfg.data_dir)
        print(f"evaluate: the demo world in {cfg.data_dir} as it was built ({data.params.get('num_users')} users, "
              f"seed {data.params.get('seed')})", flush=True)
    tasks = [load_task_data(data, t, split=cfg.split, part=cfg.part, limit=cfg.limit, data_dir=data_dir,
                            pgraphrag_dir=cfg.pgraphrag_dir or None, pgraphrag_domain=cfg.pgraphrag_domain)
             for t in cfg.tasks]
    prompt_style = cfg.prompt_style or _world_style(cfg.data, data_dir, cfg.tasks)
    checkpoints = {name: paths[0] for name, paths in named_entries(cfg.checkpoints).items()}  # one each (checked)
    sweep = [(cfg.retriever, k) for k in cfg.sweep_k] + [(r, cfg.k) for r in cfg.sweep_retrievers]

    # Every input before any decoding, every bad one in one line: a typo in the last checkpoint, a broken prediction
    # file or one over-long question must not cost the decoding of everything before it
    problems = input_problems(checkpoints, tasks, max_prompt_tokens=cfg.max_prompt_tokens, prompt_style=prompt_style)
    scored = EvalTable()  # the prediction files' rows
    if cfg.predictions:
        try:
            scored = evaluate_prediction_files(named_entries(cfg.predictions), tasks, normalize=cfg.normalize,
                                             extract=cfg.extract_answers)
        except DataError as err:
            problems.append(str(err))
    # the sweep's retrievers too: a dense encoder that cannot load is named with the rest, and each retriever is
    # built once for the main table and the sweep (the dense one also embeds each profile once)
    retrievers = {}
    for r in dict.fromkeys([cfg.retriever, *(r for r, _ in sweep)]) if checkpoints else ():
        try:
            retrievers[r] = make_retriever(r, cfg.seed, cfg.dense_encoder or None)
        except Exception as err:
            if not is_user_error(err):
                raise  # a bug, not a bad encoder folder
            problems.append(f"retriever {r}: {err}")
    if problems:
        raise DataError(" | ".join(problems))
    for path in earlier:  # overwrite/resume=true: no earlier table is left beside (or instead of) this run's
        path.unlink()
    common = dict(max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, batch_prompts=cfg.batch_prompts,
                  engine=cfg.engine, vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                  normalize=cfg.normalize, out_dir=out, prompt_style=prompt_style, retrievers=retrievers,
                  checked=True, resume=cfg.resume, dense_encoder=cfg.dense_encoder or None)  # the stamp names it
    # what the tasks read: LaMP tasks the data= folder (or demo) in its split, PGraphRAG tasks their domain's file
    lamp_tasks = [t for t in cfg.tasks if not t.startswith("PGraphRAG")]
    sources = ([f"{cfg.data} {cfg.part}, {cfg.split} split"] if lamp_tasks else []) + \
        ([f"PGraphRAG {cfg.pgraphrag_domain} {cfg.part}"] if len(lamp_tasks) < len(cfg.tasks) else [])
    scope = " + ".join(sources) + (f", first {cfg.limit} per task" if cfg.limit else "")
    # prediction files were decoded elsewhere: the retrieval setting names only what this run decodes
    title = f"{scope}, {cfg.retriever} k={cfg.k}" if checkpoints else scope
    main_setting = (cfg.retriever, cfg.k)
    settings = list(dict.fromkeys([main_setting, *sweep]))  # the main table's setting (recency k=8 in both sweeps
    #                                                         of the paper) is decoded once, first

    def main_rows(ours: EvalTable) -> EvalTable:
        """The prediction-file rows and the main setting's decoded rows (bare checkpoint names), in order."""
        table = copy.deepcopy(scored)  # a fresh copy each time: partial tables grow, `scored` stays as scored
        table.machine = ours.machine
        for name in (n for n in checkpoints if n in ours.rows):
            for task, metrics in ours.rows[name].items():
                table.add(name, task, metrics, ours.settings[name], ours.examples[task], counts=ours.counts[name][task],
                          source=ours.sources[name][task])
                table.notes += cell_notes(ours, name, task)
        return table

    def partial(ours: EvalTable) -> None:  # a crash at checkpoint 3 keeps the rows of checkpoints 1-2 on disk
        done = sum(n in ours.rows for n in checkpoints)
        if done < len(checkpoints):
            main_rows(ours).write(out, "table", f"{title} (partial: {done} of {len(checkpoints)} checkpoints)")

    ours = EvalTable()
    if checkpoints:  # one engine per checkpoint decodes the main setting and every sweep setting
        ours = evaluate_checkpoints(checkpoints, tasks, settings=settings if sweep else [main_setting],
                                    label_settings=bool(sweep), bare_setting=main_setting, after_checkpoint=partial,
                                    **common)
    main = main_rows(ours) if checkpoints else scored
    tables = {"table": main}
    main.write(out, "table", title)
    print(main.markdown(title))
    if sweep and checkpoints:
        robust = EvalTable(machine=ours.machine)
        for name in checkpoints:  # rows in sweep order, the main table's where its setting falls
            for retriever, k in dict.fromkeys(sweep):
                row = f"{name} [{retriever} k={k}]"
                src_row = name if (retriever, k) == main_setting else row
                for task, metrics in ours.rows[src_row].items():
                    robust.add(row, task, metrics, ours.settings[src_row], ours.examples[task],
                               counts=ours.counts[src_row][task], source=ours.sources[src_row][task])
                    robust.notes += [n.replace(src_row, row, 1) for n in cell_notes(ours, src_row, task)]
        robust.write(out, "robustness", f"robustness: {scope}")
        print(robust.markdown("robustness"))
        tables["robustness"] = robust
    print(f"wrote {out / 'table.md'} and {out / 'table.json'}"
          + (f", {out / 'robustness.md'} and {out / 'robustness.json'}" if "robustness" in tables else ""))
    return tables


if __name__ == "__main__":
    with exit_on_user_error("evaluate"):  # a user error: one line naming the file, record, field or key; exit 1
        run(parse_cli(EvalConfig, sys.argv[1:]))
