"""Sample the policy on training queries with and without the profile: the raw material of PRMU's preference sets.

    python recipes/prmu_rollouts.py policy=runs/sft/hf questions=.../train_questions.json \\
        outputs=.../train_outputs.json out=runs/prmu/rollouts_lamp2.jsonl n=4
    torchrun --nproc_per_node=8 recipes/prmu_rollouts.py ...          # each rank samples its share of the queries

For every query the policy is sampled `n` times from the personalised prompt (k retrieved profile items; mode
"profile") and `n` times from the same prompt without profile items (mode "no_profile"). The output is rollout
JSONL (`minitagpr.data.preferences.RolloutRecord`, one record per query and mode, with which responses were cut
by `max_new_tokens` and how many profile items the prompt dropped to fit `max_prompt_tokens`); then

    python -m minitagpr.data.preferences from-rollouts runs/prmu/rollouts_*.jsonl --out-dir runs/prmu/pairs

builds PRP (profile response over bare response) and PQP (higher verifiable reward over lower) pairs from it,
leaving out every pair with a cut response. The defaults are guided RL's paper-scale settings
(guided_rl_qwen3_8b.yaml: 4096 prompt and 2048 new tokens, k = 8, recency; vLLM on GPUs): PRMU then sees the
prompts and the kind of responses it will score in RL.

Which queries: in LaMP's user split a user is a question id, and the user table trains a row only for users with
pairs. `sample=rl` (the default) samples the questions guided RL's task mix draws for this task (`rl_tasks`,
`seed`: keep both as in the RL run, and `questions=` the file RL reads), so every RL user gets a trained row when
`limit` is 0 or at least the task's RL count (a smaller `limit` covers that fraction of them);
`sample=first` takes the file's first `limit` questions (which RL, drawing at random, mostly does not use).

Each request's samples are seeded by `seed` and its position in the whole query list (`rollout.sample_base`), and
the output lists the queries in that order: the file does not depend on `batch_prompts` or the number of processes
(up to the float rounding a batch's other prompts bring into the logits). An existing `out` is refused unless
`overwrite=true`. A killed run loses no sampling: each rank appends every finished batch to `OUT.rankNNNNN.progress`
(fsynced), and a rerun with the same settings and processes samples only the rest, so its output equals an
uninterrupted run's; progress written for other settings is refused by name (delete it to start over). An error that
one rank meets (a prompt too long in its share, progress of other settings) stops every rank
(`distributed.on_every_rank`); the ranks' records meet on rank 0 in a collective, not through the filesystem.

1. config   2. queries + prompts   3. policy + rollout engine   4. sampling   5. write (rank 0 merges the shares)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minitagpr import distributed as D
from minitagpr.cli import run_recipe
from minitagpr.config import (ConfigError, check_at_least, check_choice, check_fraction, check_number,
                              check_writable_file, parse_cli, to_dict)
from minitagpr.data import lamp, prompts, retrieval
from minitagpr.data.preferences import PreferenceDataError, RolloutRecord, rollout_record, write_rollouts
from minitagpr.model import load_pretrained
from minitagpr.model.checkpoint import files_digest, resolve_checkpoint
from minitagpr.rl.loop import RLConfig, parse_task_mix, task_mix_sample
from minitagpr.rollout import require_vllm, resolve_engine
from minitagpr.rollout.base import MIN_TEMPERATURE, sample_base
from minitagpr.tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------- 1. config
@dataclass
class RolloutConfig:
    policy: str = ""  # HF folder of the policy (an SFT or RL export, or a base model)
    questions: str = ""  # LaMP-format *_questions.json (training split)
    outputs: str = ""  # the matching *_outputs.json (golds for PQP)
    task: str = ""  # default: the task named in the outputs file
    out: str = ""  # rollout JSONL to write
    overwrite: bool = False  # true: replace an existing `out` (refused otherwise: it holds hours of sampling)
    tokenizer: str = ""  # default: the policy folder
    n: int = 4  # samples per query and mode
    # prompts and lengths as guided RL's (guided_rl_qwen3_8b.yaml): the reward model scores RL's prompts
    k: int = 8  # retrieved profile items in "profile" mode
    retriever: str = "recency"  # recency | bm25 | bm25okapi | random (seeded by `seed`), as RL; dense needs an
    #                             encoder, which only evaluate.py loads (dense_encoder=)
    prompt_style: str = "full"  # full | brief: the instruction the policy was SFT'd on and RL uses (data.prompts)
    max_prompt_tokens: int = 4096  # prompt budget: the least relevant profile items are dropped to fit (counted)
    max_new_tokens: int = 2048  # a response cut here is recorded as truncated and makes no pair
    temperature: float = 1.0  # keep RL's (1.0 in its configs): PRMU should see the responses RL will sample
    top_p: float = 1.0  # nucleus sampling (RL requires 1.0)
    # which queries (see the top of this file): "rl" = those RL's task mix `rl_tasks` draws with `seed`; "first" =
    # the file's first `limit` (most of which RL, drawing at random, does not use)
    sample: str = "rl"  # rl | first
    rl_tasks: str = RLConfig.tasks  # guided RL's task mix (default: the paper's); only this task's count is used
    limit: int = 0  # sample at most the first `limit` of those queries (0 = all)
    batch_prompts: int = 8  # prompts per generate() call
    engine: str = "auto"  # auto (vllm when installed and a GPU is present, else builtin) | builtin | vllm
    vllm_gpu_memory_utilization: float = 0.9  # vLLM's share of GPU memory; nothing else lives on the GPU here
    seed: int = 0  # RL's seed too: it picks the queries (sample=rl) and the random retriever, as in RL
    allow_eval_questions: bool = False  # true: accept a dev_/test_questions.json (PRMU then trains on evaluated ones)

    def __post_init__(self):
        for key in ("policy", "questions", "outputs", "out"):
            if not getattr(self, key):
                raise ValueError(f"{key}= is required")
        held_out = next((m for m in (re.fullmatch(r"(dev|test)_(questions|outputs)\.json", Path(f).name, re.I)
                                     for f in (self.questions, self.outputs)) if m), None)
        if held_out and not self.allow_eval_questions:  # a LaMP download names its parts' files so
            raise ValueError(f"questions={self.questions} / outputs={self.outputs} is a {held_out.group(1)} file: "
                             "PRMU pairs from it would train the reward model on the questions the evaluation "
                             "scores; pass the train part's files (or allow_eval_questions=true)")
        check_choice("engine", self.engine, ("auto", "builtin", "vllm"))
        check_choice("retriever", self.retriever, retrieval.ENCODERLESS)  # dense needs an encoder
        check_choice("prompt_style", self.prompt_style, prompts.STYLES)
        check_choice("sample", self.sample, ("rl", "first"))
        if self.sample == "rl":  # the mix's syntax now; whether it names this task once the task is known
            try:
                parse_task_mix(self.rl_tasks)
            except ValueError as e:  # its messages name RL's key, "tasks:"
                raise ValueError(f"rl_{e}") from None
        # k >= 1: with no profile item the 'profile' prompt is the bare one and PRP pairs would be pure noise
        for key in ("n", "batch_prompts", "max_new_tokens", "max_prompt_tokens", "k"):
            check_at_least(key, getattr(self, key), 1)
        check_at_least("limit", self.limit, 0)
        check_fraction("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization)
        # checked now, not at the first generate() after the policy loaded; n samples at T -> 0 would all be alike
        check_number("temperature", self.temperature, MIN_TEMPERATURE)
        check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)


def draw_questions(examples: list, task: str, cfg: RolloutConfig) -> list:
    """The queries to sample, in order: RL's draw for `task` (sample=rl) or the file's order (sample=first), then
    the first `limit` of them. RL's draw is `rl.loop.task_mix_sample` (the whole file, in order, when the mix's
    count is 0 or not below its size); tests/test_prmu_rollouts.py compares the two runs' questions."""
    if cfg.sample == "rl":
        count = dict(parse_task_mix(cfg.rl_tasks)).get(task)
        if count is None:
            raise ConfigError(f"rl_tasks: {task} is not in the RL task mix {cfg.rl_tasks!r}; give the RL run's "
                              f"tasks= or use sample=first")
        examples = task_mix_sample(examples, count, cfg.seed, task)
    return examples[:cfg.limit] if cfg.limit else examples


PROGRESS_FORMAT = "minitagpr-rollout-progress/2"  # /1 seeded by rank and batch: not resumable with /2


def _progress_header(cfg: RolloutConfig, info, requests, policy_digest: str, engine_kind: str) -> dict:
    """What a progress file must have been written for: every setting that changes the samples, the policy's
    weights and tokenizer (`files_digest`: policy= names a path, and a re-export into it is another policy), the
    engine that samples, this rank's place and its requests (ids, modes and prompts)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("vllm_gpu_memory_utilization", "overwrite")}
    h = hashlib.sha256(json.dumps([settings, policy_digest, engine_kind, info.rank, info.world_size,
                                   [(ex.id, mode, msgs) for ex, mode, msgs, _, _ in requests]]).encode())
    return {"format": PROGRESS_FORMAT, "fingerprint": h.hexdigest()[:16]}


def _read_progress(path: Path, header: dict) -> dict[int, list[RolloutRecord]]:
    """{batch start: its records} from an earlier run's progress file ({} when there is none). A last line cut by a
    kill is dropped (that batch is sampled again); a file written for other settings is refused by name."""
    lines = path.read_bytes().splitlines() if path.exists() else []  # bytes: a kill can cut a character in two
    if not lines:  # none yet (or killed before its header was on disk): start it
        _write_progress(path, header, {})
        return {}
    try:
        first = json.loads(lines[0]) if lines else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        first = None
    if first != header:
        raise ConfigError(f"{path}: sampling progress of an earlier run with other settings, queries or processes "
                          f"(its header {first!r:.120}, this run {header}); rerun with those settings to finish it, "
                          f"or delete the file to start over")
    done = {}
    for lineno, line in enumerate(lines[1:], start=2):
        try:
            entry = json.loads(line.decode("utf-8"))
            start = entry["start"]
            if isinstance(start, bool) or not isinstance(start, int) or not isinstance(entry["records"], list):
                raise TypeError("'start' must be an int and 'records' a list")
            # each record checked as the rollout file's reader checks it: a bad one must not reach `out`
            done[start] = [rollout_record(path, lineno, r) for r in entry["records"]]
        except (ValueError, KeyError, TypeError) as e:  # JSON, UTF-8 and a record's field (PreferenceDataError)
            if lineno == len(lines):  # the write a kill cut short: rewrite the file without it
                _write_progress(path, header, done)
                break
            # a record's own error already names path:line, record and field
            where = str(e) if isinstance(e, PreferenceDataError) else \
                f"{path}:{lineno}: not a progress line ({type(e).__name__})"
            raise ConfigError(f"{where}; remove line {lineno} of {path} to sample only that batch again (each "
                              "request is seeded by its place in the run: the rollouts come out the same), or delete "
                              "the file to start over") from None
    return done


def _progress_line(start: int, records: list[RolloutRecord]) -> str:
    entry = {"start": start, "records": [{k: v for k, v in asdict(r).items() if k != "origin"} for r in records]}
    return json.dumps(entry, ensure_ascii=False) + "\n"


def _write_progress(path: Path, header: dict, done: dict[int, list[RolloutRecord]]) -> None:
    """The whole file, atomically: the header line, then one line per finished batch."""
    tmp = path.with_name(path.name + ".tmp")
    D.write_synced(tmp, (json.dumps(header) + "\n" + "".join(_progress_line(s, done[s]) for s in sorted(done)))
                   .encode("utf-8"))
    os.replace(tmp, path)


def _append_progress(path: Path, start: int, records: list[RolloutRecord]) -> None:
    """One line per finished batch, on disk before the next batch starts."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(_progress_line(start, records))
        f.flush()
        os.fsync(f.fileno())


def run(cfg: RolloutConfig) -> Path:
    engine_kind = resolve_engine(cfg.engine)
    if engine_kind == "vllm":
        require_vllm(cfg.temperature)
    # the ranks sample their shares with no collective in between, then meet to merge: the fastest may wait long
    # for the slowest (hours of 2,048-token samples per rank), past the default 30-minute collective timeout
    info = D.init_distributed(timeout_s=12 * 3600)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    D.on_main(lambda: check_out(out, cfg.overwrite))  # before any sampling, so no rollout is lost at the end

    # ------------------------------------------------------------------------------------------- 2. queries
    task = lamp.canonical_task(cfg.task or lamp.load_outputs(cfg.outputs)[0])  # default: the file's own task
    _, golds = lamp.load_outputs(cfg.outputs, task)  # checks the file's task and that every gold is an answer
    examples = lamp.load_questions(cfg.questions, task)
    lamp.check_no_extra_golds(golds, examples, cfg.outputs, cfg.questions)  # the whole file, before `limit`
    in_file = len(examples)
    examples = draw_questions(examples, task, cfg)
    if cfg.sample == "rl":  # the coverage of RL's users (question ids in LaMP's user split) by PRMU's pairs
        rl_count = dict(parse_task_mix(cfg.rl_tasks))[task] or in_file
        D.log(f"queries: {len(examples)} of the {min(rl_count, in_file)} questions RL draws for {task} "
              f"(rl_tasks={cfg.rl_tasks!r}, seed={cfg.seed}) from the {in_file} in {cfg.questions}")
    else:
        D.log(f"queries: the first {len(examples)} of the {in_file} in {cfg.questions} (sample=first)")
    missing = [ex.id for ex in examples if ex.id not in golds]
    if missing:
        raise lamp.DataError(f"{cfg.outputs}: no gold output for question ids {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''} of {cfg.questions}")
    tokenizer = Tokenizer.from_dir(cfg.tokenizer or resolve_checkpoint(cfg.policy))
    if mismatch := prompts.style_mismatch(resolve_checkpoint(cfg.policy), cfg.prompt_style):
        raise ConfigError(f"policy {cfg.policy}: {mismatch}")  # the PRMU would learn from prompts RL never shows
    # each rank its own share (query g on rank g % world size), and its progress: an error met in one share stops all
    progress = out.with_name(f"{out.name}.rank{info.rank:05d}.progress")
    requests, done = D.on_every_rank(lambda: share_requests(examples, cfg, tokenizer, info, engine_kind, progress))
    if done:
        D.log(f"rollouts: rank {info.rank} resumes {len(done)} finished batch(es) "
              f"({sum(map(len, done.values()))} requests) from {progress}")

    # ------------------------------------------------------------------------------------------- 3-4. engine, sampling
    # a rank that fails (out of memory, a full disk) stops the others at the merge below; every finished batch stays
    # in the progress files for the rerun
    records = D.on_every_rank(lambda: sample_share(requests, done, cfg, tokenizer, golds, task, engine_kind,
                                                   progress))

    # ------------------------------------------------------------------------------------------- 5. write
    shares = D.gather_to_main(records)
    D.on_main(lambda: write_merged(out, shares, len(examples), cfg))
    return out


def check_out(out: Path, overwrite: bool) -> None:
    check_writable_file(out, "out")
    if out.exists() and not overwrite:
        raise ConfigError(f"out={out} exists (a finished run's rollouts); give another out= or overwrite=true")


def share_requests(examples: list, cfg: RolloutConfig, tokenizer: Tokenizer, info, engine_kind: str,
                   progress: Path) -> tuple[list, dict]:
    """This rank's requests (example, mode, messages, retrieved items left out, global request index) and the
    batches an earlier run of the same settings finished ({batch start: records}, from its progress file)."""
    retriever = retrieval.get_retriever(cfg.retriever, seed=cfg.seed)
    requests = []
    for g in range(info.rank, len(examples), info.world_size):
        ex = examples[g]
        items = retriever.select(ex, cfg.k)
        try:
            with_profile, kept = prompts.fit_messages(ex, items, tokenizer, cfg.max_prompt_tokens,
                                                      style=cfg.prompt_style)
        except prompts.PromptTooLongError as e:  # it names the example; the file is known here
            raise prompts.PromptTooLongError(f"{cfg.questions}: {e}") from None
        bare = prompts.build_messages(ex, [], tokenizer, cfg.max_prompt_tokens, style=cfg.prompt_style)
        requests += [(ex, "profile", with_profile, len(items) - kept, 2 * g),
                     (ex, "no_profile", bare, 0, 2 * g + 1)]
    header = _progress_header(cfg, info, requests, files_digest(resolve_checkpoint(cfg.policy)), engine_kind)
    return requests, _read_progress(progress, header)


def sample_share(requests: list, done: dict, cfg: RolloutConfig, tokenizer: Tokenizer, golds: dict, task: str,
                 engine_kind: str, progress: Path) -> list[RolloutRecord]:
    """Sample this rank's requests batch by batch (the engine built only when a batch is left), appending each
    finished batch (fsynced) to `progress`; batches in `done` are taken as they are. Records in request order."""
    engine, records, stops = None, [], tokenizer.stop_ids
    for start in range(0, len(requests), cfg.batch_prompts):
        if start in done:  # records stay in request order, resumed or sampled
            records += done[start]
            continue
        engine = engine or build_engine(cfg, tokenizer, engine_kind)
        D.fault_point("batch", start)  # crash-recovery tests kill the run here
        batch = requests[start:start + cfg.batch_prompts]
        ids = [tokenizer.apply_chat(msgs, add_generation_prompt=True, enable_thinking=True) for _, _, msgs, _, _ in
               batch]
        groups = engine.generate(ids, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_new_tokens=cfg.max_new_tokens, stop_token_ids=stops,
                                 seed=[sample_base(cfg.seed, g) for *_, g in batch])  # its place in the whole run
        batch_records = [RolloutRecord(id=ex.id, user=ex.user, task=task, mode=mode, prompt=msgs,
                                       gold=golds[ex.id], responses=[c.text for c in group],
                                       # as the RL loop's R_f: "length" = cut by max_new_tokens
                                       truncated=[c.finish_reason == "length" for c in group],
                                       profile_items_dropped=dropped)
                         for (ex, mode, msgs, dropped, _), group in zip(batch, groups)]
        _append_progress(progress, start, batch_records)
        records += batch_records
        D.log(f"rollouts: {min(start + cfg.batch_prompts, len(requests))}/{len(requests)} requests on rank 0")
    return records


def build_engine(cfg: RolloutConfig, tokenizer: Tokenizer, engine_kind: str):
    if engine_kind == "vllm":
        from minitagpr.rollout import VLLMEngine
        # sleep_level=0: the weights never change here, so sleeping after every batch would only reload them
        return VLLMEngine(resolve_checkpoint(cfg.policy), tokenizer, sleep_level=0, seed=cfg.seed,
                          gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                          max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens)
    from minitagpr.rollout import BuiltinEngine
    return BuiltinEngine(load_pretrained(cfg.policy, dtype=torch.float32, device=D.world().device).eval(), tokenizer)


def merge_shares(shares: list[list], num_queries: int) -> list:
    """The ranks' records in query order. Rank r holds its queries r, r + W, r + 2W, ... (W = len(shares)) in
    order, two records each (profile, no_profile)."""
    w = len(shares)
    return [rec for g in range(num_queries) for rec in shares[g % w][2 * (g // w):2 * (g // w) + 2]]


def write_merged(out: Path, shares: list[list[RolloutRecord]], num_queries: int, cfg: RolloutConfig) -> None:
    """Rank 0: every rank's records (`shares`, one list per rank) in query order, written atomically, then the
    progress files removed (a kill in between leaves them: a rerun with overwrite=true resumes from them)."""
    merged = merge_shares(shares, num_queries)
    write_rollouts(out, merged)
    for r in range(len(shares)):  # the merged file now holds every rank's finished batches
        out.with_name(f"{out.name}.rank{r:05d}.progress").unlink(missing_ok=True)
    D.log(f"wrote {len(merged)} rollout records ({num_queries} queries x 2 modes x n={cfg.n}) to {out}")
    cut = sum(t for r in merged for t in r.truncated)
    D.log(f"cut by max_new_tokens={cfg.max_new_tokens}: {cut} of {sum(len(r.responses) for r in merged)} "
          f"responses (they make no PRP/PQP pair)")
    short = [r.profile_items_dropped for r in merged if r.mode == "profile" and r.profile_items_dropped]
    D.log(f"profile prompts that dropped retrieved items to fit max_prompt_tokens={cfg.max_prompt_tokens}: "
          f"{len(short)} of {num_queries} ({sum(short)} items in all)")


if __name__ == "__main__":
    run_recipe("prmu_rollouts", lambda: run(parse_cli(RolloutConfig, sys.argv[1:])))
    D.end_process()  # skip interpreter finalization (see there)
