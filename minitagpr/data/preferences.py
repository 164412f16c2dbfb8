"""Preference pairs for PRMU: the two sets of TagPR (tagpr-method.md, "PRMU").

- **PRP** (profile preference): one query of user u, answered once *with* u's profile in the prompt (chosen) and
  once *without* it (rejected). Both responses are scored against the same profile-bearing prompt, because that is
  the only prompt the reward model sees in guided RL; the pair teaches it that a response which used the profile is
  better than one that could not.
- **PQP** (quality preference): two personalised responses to the same prompt; the chosen one has the higher
  verifiable reward R_v (exact-match correctness for classification tasks, ROUGE for generation tasks). Ties are
  dropped, never broken at random.

Where pairs come from (the `source` field of every pair says which):
- `"rollout"`: `build_pairs_from_rollouts` reads rollout JSONL files written by `recipes/prmu_rollouts.py`, which
  samples the policy with the rollout engine twice per training query (mode "profile" and mode "no_profile").
  This is the paper's construction. A query is (task, example id); its two records must agree on user, gold and
  the number of responses, else the files are refused (`_group_by_query`). Pair ids: `{PRP,PQP}/<task>/<id>/<k>`.
  A response cut by the length limit (`RolloutRecord.truncated`) is in no pair: its chain and answer are a
  fragment, which would teach the reward model to prefer one fragment over another. The builders count what they
  leave out, and `RolloutPairs.summary()` says it (files from before `truncated` was recorded: said once, kept).
- `"synthetic"`: `synthesize_demo_pairs` builds pairs from the demo world alone, without any policy, so the demo
  pipeline gets a useful PRMU before a policy exists. Chains come from `demo_world.make_chain`: PRP = chain over the
  retrieved profile + gold answer vs chain over no profile + a profile-blind answer; PQP = chain + gold answer vs
  the same kind of chain + a worse answer (the blind answer or another label); plus "user-dependent" PQP pairs on
  the demo world's questions that two users share but answer differently (`user_dependent=True`; see there); and
  a third set, "style": the gold answer argued concisely vs thoroughly, decided by the user's hidden reasoning
  style (`DemoWorld.reasoning_styles`), which only the PRMU's user table can learn.

File format (one JSON object per line; what `write_pairs` writes and `read_pairs` validates):
    {"id", "set": "PRP"|"PQP"|"style", "source": "rollout"|"synthetic", "user": str|null, "task", "example_id",
     "prompt": [chat messages], "chosen": {"text", "chain", "answer"}, "rejected": {...}, "user_dependent": bool}
`text` is exactly what the reward model reads after the prompt (the raw policy output for rollouts;
`format_response(chain, answer)` for synthetic pairs). This module is plain Python: no tensors.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from minitagpr.atomic import atomic_write_text
from minitagpr.config import ConfigError, check_writable_dir
from minitagpr.data.answers import extract_answer
from minitagpr.data.lamp import DataError, canonical_task, gold_problem, json_object_lines, not_a_file
from minitagpr.tokenizer import assistant_target, check_messages

SETS = ("PRP", "PQP", "style")  # "style": the demo world's hidden per-user preference (synthesize_demo_pairs)
SOURCES = ("rollout", "synthetic")
MODES = ("profile", "no_profile")
ROLES = ("system", "user", "assistant")


class PreferenceDataError(ValueError):
    """A preference or rollout file that cannot be used; the message names the file, line, record and field."""


# ---------------------------------------------------------------------------------------------------------------
# 1. Records
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Response:
    text: str  # what the reward model reads after the prompt
    chain: str  # the reasoning inside <think> ... </think>
    answer: str  # what follows the last </think>, stripped


@dataclass(frozen=True)
class PreferencePair:
    id: str
    set: str  # "PRP" | "PQP" | "style"
    source: str  # "rollout" | "synthetic"
    user: str | None
    task: str
    example_id: str
    prompt: list  # chat messages (with the profile, except "style" pairs); both sides are scored against it
    chosen: Response
    rejected: Response
    user_dependent: bool = False  # the preference flips between users who share this query


@dataclass(frozen=True)
class RolloutRecord:
    """The sampled responses of one query in one mode (what `recipes/prmu_rollouts.py` writes, one per line)."""

    id: str  # the LaMP example id
    user: str | None
    task: str
    mode: str  # "profile": prompt carries the retrieved profile; "no_profile": the same query without it
    prompt: list  # the chat messages the policy was sampled from
    gold: str
    responses: list  # list[str], raw policy outputs
    # per response: cut by max_new_tokens (the engine's finish_reason "length"); None = not recorded (older files)
    truncated: list | None = None
    # retrieved profile items left out of this prompt to fit max_prompt_tokens (0 in "no_profile"); None = not recorded
    profile_items_dropped: int | None = None
    origin: str = field(default="", compare=False, repr=False)  # "file:line" it was read from (errors); not written


def format_response(chain: str, answer: str) -> str:
    """The assistant text of the SFT target format, `<think>\\n{chain}\\n</think>\\n\\n{answer}` (no <|im_end|>)."""
    return assistant_target(chain, answer)


def split_response(text: str) -> tuple[str, str]:
    """(chain, answer) of a raw response: chain between the first <think> and the last </think>; the answer is
    `answers.extract_answer(text)`, the reading RL's R_v uses, so a PQP pair is ordered as the reward would order it.

    A response without </think> has no chain. Its answer is its whole text when it has no <think> either, and ""
    when it opened <think> and never closed it (its chain's words are not an answer; the format reward, not this
    module, judges the layout)."""
    answer = extract_answer(text)
    end = text.rfind("</think>")
    if end < 0:
        return "", answer
    start = text.find("<think>")
    start = start + len("<think>") if 0 <= start < end else 0
    return text[start:end].strip(), answer


def response_from_text(text: str) -> Response:
    chain, answer = split_response(text)
    return Response(text=text, chain=chain, answer=answer)


# ---------------------------------------------------------------------------------------------------------------
# 2. Reading and writing JSONL with errors that name file, line, record and field
# ---------------------------------------------------------------------------------------------------------------
def _write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    """Readers see the old file or the whole new one, never half of it (atomic_write_text)."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _iter_jsonl(path: Path):
    """(line number, dict) for every non-blank line; bad UTF-8, bad JSON or a non-object fails naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: {not_a_file(path)}")
    yield from json_object_lines(path, lambda lineno, msg: PreferenceDataError(f"{path}:{lineno}: {msg}"))


class _Fields:
    """Typed field access for one record; every failure names file:line, the record id and the field."""

    def __init__(self, path: Path, lineno: int, obj: dict):
        self.obj, self.where = obj, f"{path}:{lineno}"
        rid = obj.get("id")
        self.where += f" (record id {rid!r})" if isinstance(rid, str) else ""

    def fail(self, field: str, msg: str):
        raise PreferenceDataError(f"{self.where}: field {field!r}: {msg}")

    def get(self, field: str, kind, obj=None, prefix: str = "", optional: bool = False, nullable: bool = False):
        """`optional`: absent or null gives None; `nullable`: must be present, null gives None."""
        obj = self.obj if obj is None else obj
        name = prefix + field
        if field not in obj:
            if optional:
                return None
            self.fail(name, "missing" + (" (null if there is none)" if nullable else ""))
        value = obj[field]
        if (optional or nullable) and value is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            kinds = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.fail(name, f"expected {kinds}, got {type(value).__name__}")
        return value

    def task(self) -> str:
        raw = self.get("task", str)
        try:
            return canonical_task(raw)
        except DataError as e:
            self.fail("task", str(e))

    def messages(self, field: str = "prompt") -> list:
        msgs = self.get(field, list)
        if not msgs:
            self.fail(field, "empty message list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                self.fail(f"{field}[{i}]", f"expected an object, got {type(m).__name__}")
            role = self.get("role", str, m, f"{field}[{i}].")
            if role not in ROLES:
                self.fail(f"{field}[{i}].role", f"unknown role {role!r} (known: {', '.join(ROLES)})")
            self.get("content", str, m, f"{field}[{i}].")
        try:  # what the chat renderer would refuse later (unknown fields, tool turns...), named here
            check_messages(msgs)
        except ValueError as e:
            self.fail(field, str(e))
        if msgs[-1]["role"] != "user":  # the responses answer the prompt: it ends with the user's request
            self.fail(f"{field}[{len(msgs) - 1}].role", f"the prompt must end with a user turn, got "
                                                        f"{msgs[-1]['role']!r}")
        return msgs

    def response(self, field: str) -> Response:
        obj = self.get(field, dict)
        return Response(*(self.get(k, str, obj, f"{field}.") for k in ("text", "chain", "answer")))


def write_pairs(path: str | Path, pairs: Iterable[PreferencePair]) -> None:
    _write_jsonl_atomic(Path(path), (asdict(p) for p in pairs))


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """All pairs of one file, validated; an empty file or a duplicated pair id is an error."""
    path = Path(path)
    pairs, seen = [], {}
    for lineno, obj in _iter_jsonl(path):
        f = _Fields(path, lineno, obj)
        pid = f.get("id", str)
        if pid in seen:
            f.fail("id", f"duplicate pair id (first on line {seen[pid]})")
        seen[pid] = lineno
        set_name = f.get("set", str)
        if set_name not in SETS:
            f.fail("set", f"unknown set {set_name!r} (known: {', '.join(SETS)})")
        source = f.get("source", str)
        if source not in SOURCES:
            f.fail("source", f"unknown source {source!r} (known: {', '.join(SOURCES)})")
        chosen, rejected = f.response("chosen"), f.response("rejected")
        if chosen.text == rejected.text:  # a constant log 2 in the loss, and always a miss in held-out accuracy
            f.fail("rejected.text", "identical to chosen.text: a tie carries no preference")
        pairs.append(PreferencePair(
            id=pid, set=set_name, source=source, user=f.get("user", str, nullable=True), task=f.task(),
            example_id=f.get("example_id", str), prompt=f.messages(), chosen=chosen, rejected=rejected,
            user_dependent=bool(f.get("user_dependent", bool, optional=True)),
        ))
    if not pairs:
        raise PreferenceDataError(f"{path}: empty preference set (no pair records)")
    return pairs


def write_rollouts(path: str | Path, records: Iterable[RolloutRecord]) -> None:
    _write_jsonl_atomic(Path(path), ({k: v for k, v in asdict(r).items() if k != "origin"} for r in records))


def read_rollouts(path: str | Path) -> list[RolloutRecord]:
    """All rollout records of one file, validated; an empty file, an empty response list or a repeated
    (task, id, mode) is an error."""
    path = Path(path)
    records, seen = [], {}
    for lineno, obj in _iter_jsonl(path):
        record = rollout_record(path, lineno, obj)
        key = (record.task, record.id, record.mode)
        if key in seen:
            _Fields(path, lineno, obj).fail("id", f"duplicate (task, id, mode) (first on line {seen[key]})")
        seen[key] = lineno
        records.append(record)
    if not records:
        raise PreferenceDataError(f"{path}: empty rollout file (no records)")
    return records


def rollout_record(path: Path, lineno: int, obj) -> RolloutRecord:
    """One rollout record (a JSON object read from `path`:`lineno`), every field checked: PreferenceDataError
    naming file, line, record and field otherwise."""
    if not isinstance(obj, dict):
        raise PreferenceDataError(f"{path}:{lineno}: a rollout record must be a JSON object, got {type(obj).__name__}")
    f = _Fields(path, lineno, obj)
    rid, task, mode = f.get("id", str), f.task(), f.get("mode", str)
    if mode not in MODES:
        f.fail("mode", f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    responses = f.get("responses", list)
    if not responses:
        f.fail("responses", "empty response list (a query is sampled n >= 1 times in each mode)")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            f.fail(f"responses[{i}]", f"expected str, got {type(r).__name__}")
    gold = f.get("gold", str)
    if why := gold_problem(task, gold):  # a gold no answer can match would only show as "no PQP pairs"
        f.fail("gold", why)
    truncated = f.get("truncated", list, optional=True)  # absent in files written before it was recorded
    if truncated is not None:
        if len(truncated) != len(responses):
            f.fail("truncated", f"{len(truncated)} flags for {len(responses)} responses")
        for i, t in enumerate(truncated):
            if not isinstance(t, bool):
                f.fail(f"truncated[{i}]", f"expected bool, got {type(t).__name__}")
    dropped = f.get("profile_items_dropped", int, optional=True)
    if dropped is not None and dropped < 0:
        f.fail("profile_items_dropped", f"expected a count >= 0, got {dropped}")
    return RolloutRecord(
        id=rid, user=f.get("user", str, nullable=True), task=task, mode=mode, prompt=f.messages(),
        gold=gold, responses=responses, truncated=truncated, profile_items_dropped=dropped,
        origin=f"{path}:{lineno}",
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. Pairs from policy rollouts (the paper's construction)
# ---------------------------------------------------------------------------------------------------------------
def _cut(record: RolloutRecord) -> list[bool]:
    """Per response: cut by the length limit. Not recorded (an older file) counts as not cut: kept, as before."""
    return record.truncated if record.truncated is not None else [False] * len(record.responses)


def build_prp(records: list[RolloutRecord], max_per_example: int = 2,
              seed: int = 0) -> tuple[list[PreferencePair], int, int]:
    """PRP: response i sampled with the profile (chosen) vs response i sampled without it (rejected).

    Both are scored against the profile prompt. Identical texts carry no preference and are skipped; a query
    sampled only with the profile gives no PRP pair (its responses still make PQP pairs), nor does one whose
    profile prompt is its bare prompt (no profile item entered it: k=0, or none fit max_prompt_tokens), since its
    two sides are draws from one distribution. The records of a query are checked as `_group_by_query` says. A
    candidate with a side cut by the length limit is left out before the cap, so a query still gives up to
    `max_per_example` whole pairs. Returns (pairs, candidates left out as cut, queries left out as profile-less)."""
    rng = random.Random(seed)
    pairs, n_cut, n_bare = [], 0, 0
    for (task, rid), modes in _group_by_query(records).items():
        if "no_profile" not in modes:
            continue
        with_p, without_p = modes["profile"], modes["no_profile"]
        if with_p.prompt == without_p.prompt:
            n_bare += 1
            continue
        candidates = [(a, b, ca or cb) for a, b, ca, cb in  # equal lengths (_group_by_query)
                      zip(with_p.responses, without_p.responses, _cut(with_p), _cut(without_p)) if a != b]
        n_cut += sum(cut for _, _, cut in candidates)
        candidates = [(a, b) for a, b, cut in candidates if not cut]
        rng.shuffle(candidates)
        for k, (a, b) in enumerate(candidates[:max_per_example]):
            pairs.append(PreferencePair(
                id=f"PRP/{task}/{rid}/{k}", set="PRP", source="rollout", user=with_p.user, task=task,
                example_id=rid, prompt=with_p.prompt,
                chosen=response_from_text(a), rejected=response_from_text(b),
            ))
    return pairs, n_cut, n_bare


def build_pqp(
    records: list[RolloutRecord],
    reward_fn: Callable[[str, str, str], float] | None = None,
    max_per_example: int = 2,
    seed: int = 0,
) -> tuple[list[PreferencePair], int]:
    """PQP: two profile-mode responses of one query, chosen = higher R_v(task, answer, gold); ties dropped.

    R_v defaults to `minitagpr.rewards.verifiable_reward` (exact match for classification, ROUGE for generation).
    Among the strictly ordered pairs of a query, those with a side cut by the length limit are left out (a cut
    response's "answer" is whatever text it ended on), then up to `max_per_example` are kept, drawn with a seeded
    rng. Returns (pairs, ordered candidates left out as cut)."""
    if reward_fn is None:
        from minitagpr.rewards import verifiable_reward as reward_fn
    rng = random.Random(seed)
    pairs, n_cut = [], 0
    for (task, rid), modes in _group_by_query(records).items():
        rec = modes["profile"]
        scored = [(response_from_text(t), t) for t in rec.responses]
        rewards = [float(reward_fn(task, resp.answer, rec.gold)) for resp, _ in scored]
        cut = _cut(rec)
        ordered = [
            (i, j) if rewards[i] > rewards[j] else (j, i)
            for i in range(len(scored)) for j in range(i + 1, len(scored))
            if rewards[i] != rewards[j]  # a tie says nothing about which is better: drop it
        ]
        n_cut += sum(cut[i] or cut[j] for i, j in ordered)
        ordered = [(i, j) for i, j in ordered if not (cut[i] or cut[j])]
        rng.shuffle(ordered)
        for k, (i, j) in enumerate(ordered[:max_per_example]):
            pairs.append(PreferencePair(
                id=f"PQP/{task}/{rid}/{k}", set="PQP", source="rollout", user=rec.user, task=task,
                example_id=rid, prompt=rec.prompt, chosen=scored[i][0], rejected=scored[j][0],
            ))
    return pairs, n_cut


@dataclass
class RolloutPairs:
    """What `build_pairs_from_rollouts` returns: both sets, and what the rollouts held that is in no pair."""

    sets: dict  # {"PRP": [PreferencePair], "PQP": [...]}
    cut_pairs: dict  # per set: candidate pairs left out because a side was cut by the length limit
    recorded_responses: int  # responses whose record says whether each was cut
    cut_responses: int  # of them, cut by the length limit
    unrecorded: int  # records without `truncated` (written before it was recorded): cut or not is unknown
    records: int
    profile_prompts: int  # "profile" records that record `profile_items_dropped`
    short_prompts: int  # of them, prompts that dropped retrieved items to fit max_prompt_tokens
    items_dropped: int  # the items those prompts dropped, in all
    profileless: int = 0  # queries with both modes whose profile prompt held no profile item: no PRP pair
    paired_queries: int = 0  # queries sampled in both modes

    def summary(self) -> list[str]:
        """One line per thing a reader of the pair counts should know; nothing left out is left unsaid."""
        lines = []
        if self.recorded_responses:
            lines.append(f"responses cut by the length limit: {self.cut_responses} of {self.recorded_responses}; "
                         f"left out " + ", ".join(f"{n} {name}" for name, n in self.cut_pairs.items())
                         + " candidate pairs with a cut side")
        if self.unrecorded:
            lines.append(f"note: {self.unrecorded} of {self.records} rollout records have no 'truncated' field "
                         f"(written before it was recorded): whether their responses were cut by the length limit "
                         f"is unknown, so none of them was left out")
        if self.profile_prompts:
            lines.append(f"profile prompts that dropped retrieved items to fit max_prompt_tokens: "
                         f"{self.short_prompts} of {self.profile_prompts} ({self.items_dropped} items in all)")
        if self.profileless:
            lines.append(f"queries whose 'profile' prompt held no profile item (k=0, or none fit "
                         f"max_prompt_tokens), left out of PRP: {self.profileless} of {self.paired_queries}")
        return lines


def build_pairs_from_rollouts(paths: list[str | Path], max_per_example: int = 2, seed: int = 0,
                              reward_fn=None) -> RolloutPairs:
    if max_per_example < 1:  # a negative cap silently dropped the last candidate ([:-1]); 0 built nothing
        raise PreferenceDataError(f"max_per_example must be >= 1, got {max_per_example}")
    records = [r for p in paths for r in read_rollouts(p)]
    prp, prp_cut, profileless = build_prp(records, max_per_example, seed)
    pqp, pqp_cut = build_pqp(records, reward_fn, max_per_example, seed)
    budgeted = [r for r in records if r.mode == "profile" and r.profile_items_dropped is not None]
    return RolloutPairs(
        sets={"PRP": prp, "PQP": pqp}, cut_pairs={"PRP": prp_cut, "PQP": pqp_cut},
        recorded_responses=sum(len(r.responses) for r in records if r.truncated is not None),
        cut_responses=sum(sum(_cut(r)) for r in records),
        unrecorded=sum(r.truncated is None for r in records), records=len(records),
        profile_prompts=len(budgeted), short_prompts=sum(r.profile_items_dropped > 0 for r in budgeted),
        items_dropped=sum(r.profile_items_dropped for r in budgeted),
        profileless=profileless, paired_queries=len({(r.task, r.id) for r in records if r.mode == "no_profile"}),
    )


def _group_by_query(records: list[RolloutRecord]) -> dict[tuple[str, str], dict[str, RolloutRecord]]:
    """{(task, id): {mode: record}}: a query is one task's question id, since two tasks may reuse an id.

    What `recipes/prmu_rollouts.py` writes for every query, and so what is checked: one record per mode; a
    'profile' record, and beside it at most one 'no_profile' record with the same user, the same gold and the same
    number of responses (response i of one mode is paired with response i of the other)."""
    out: dict[tuple[str, str], dict[str, RolloutRecord]] = defaultdict(dict)
    for r in records:
        modes = out[r.task, r.id]
        if r.mode in modes:
            raise _query_error([modes[r.mode], r], "mode", f"two {r.mode!r} records")
        modes[r.mode] = r
    for (task, rid), modes in out.items():
        if "profile" not in modes:
            others = sorted(t for (t, i), m in out.items() if i == rid and t != task and "profile" in m)
            hint = f" (id {rid!r} has one for {', '.join(others)}: rollouts of two tasks mixed up?)" if others else ""
            raise _query_error(modes.values(), "mode", f"a 'no_profile' record without its 'profile' record{hint}")
        if "no_profile" not in modes:
            continue
        with_p, without_p = modes["profile"], modes["no_profile"]
        for name in ("user", "gold"):
            if getattr(with_p, name) != getattr(without_p, name):
                raise _query_error([with_p, without_p], name, f"{getattr(with_p, name)!r} in the 'profile' record, "
                                                              f"{getattr(without_p, name)!r} in the 'no_profile' one")
        if len(with_p.responses) != len(without_p.responses):
            raise _query_error([with_p, without_p], "responses", f"{len(with_p.responses)} in the 'profile' record, "
                                                                 f"{len(without_p.responses)} in the 'no_profile' one "
                                                                 f"(PRP pairs response i with response i)")
    return dict(out)


def _query_error(records: Iterable[RolloutRecord], field_name: str, msg: str) -> PreferenceDataError:
    """An error about the records of one query, naming where each was read (file:line) when it came from a file."""
    records = list(records)
    where = " and ".join(r.origin for r in records if r.origin) or "rollouts"
    return PreferenceDataError(f"{where} (query {records[0].id!r} of {records[0].task}): field {field_name!r}: {msg}")


# ---------------------------------------------------------------------------------------------------------------
# 4. Synthetic pairs from the demo world (no policy needed; demo only)
# ---------------------------------------------------------------------------------------------------------------
def synthesize_demo_pairs(world_dir: str | Path, *, split: str = "train", max_per_set: int = 0,
                          seed: int = 0, reward_fn=None) -> dict[str, list[PreferencePair]]:
    """PRP, PQP and style pairs built from a demo world's questions, golds and chain program, all `source="synthetic"`.

    For every question of `split` (prompt = the k most recent profile items, in the world's prompt style as its SFT
    records, guided RL and the table render theirs; the PRMU reads no system message, `encode_reward_input`, so
    the style shows in the pair files and changes no score):
    - PRP: chosen = `make_chain(items, gold)` + gold; rejected = `make_chain(no items, blind)` + blind, where blind
      is the world's profile-blind answer (what a response that never saw the profile would say).
    - PQP, quality (`PQP/<id>`): chosen = `make_chain(items, gold)` + gold; rejected = `make_chain(items, wrong)`
      + wrong over the same items, wrong = the blind answer, or another label when the blind answer is right.
    - PQP, whose answer (`PQP/<id>/user`): the user's gold vs the answer another user would give to the same query:
      in the world's user-dependent groups (one input, a different gold per user) the other member's actual gold
      (these pairs are marked `user_dependent`), elsewhere `aware_answer` over another user's history. Both
      responses are one chain that does not restate the profile (`make_chain` over no items, the same wording) and
      differ only in the answer, so the winner depends on who asks: the evidence is the profile in the prompt or
      the user's row of E. The held-out `user_dependent` pairs measure what the user table adds.
    - style (`style/<id>`): chosen and rejected argue for the gold alike (`make_chain` over no items, one seed;
      the segments both have are worded independently, as in any two chains: a version that worded them alike
      learnt more slowly, bench/RESULTS.md), one in 3 segments and one in 6 (5 where the program has no more);
      the user's hidden reasoning style (`DemoWorld.reasoning_styles`, half the users each) picks the winner.
      The prompt is the query *without* profile items (as a k = 0 prompt renders it: "No history is available
      for this user."): the items' signature words name the user, and with them in the prompt a PRMU without
      the table learnt each user's style from those words (held-out 0.682 vs 0.733 with the table, of which
      0.03 came from the user's row; bench/RESULTS.md), so the pairs would not show what the table adds.
    Every PQP pair satisfies R_v(rejected) < R_v(chosen) (ties are dropped, as for rollout pairs).
    `max_per_set` > 0 keeps a seeded random subset of each set."""
    from minitagpr.data import demo_world as dw  # the demo world is only needed here
    from minitagpr.data.answers import LABELS
    from minitagpr.data.prompts import build_messages
    from minitagpr.data.retrieval import get_retriever
    if reward_fn is None:
        from minitagpr.rewards import verifiable_reward as reward_fn

    world = dw.DemoWorld.load(world_dir)
    k, style = world.params["k"], world.params["prompt_style"]
    retriever = get_retriever("recency")
    other_golds: dict[str, list[str]] = {}  # question id -> golds of the other users who got the same input
    for task in world.tasks:
        golds = world.golds(task, split)
        for group in world.user_dependent_groups:
            if all(i in golds for i in group):
                for i in group:
                    other_golds[i] = [golds[j] for j in group if j != i]

    sets: dict[str, list[PreferencePair]] = {name: [] for name in SETS}
    for task in world.tasks:
        golds = world.golds(task, split)
        examples = world.examples(task, split)
        history: dict[str, list] = {}  # user -> the recent items of the user's first question (their visible taste)
        for ex in examples:
            history.setdefault(ex.user, retriever.select(ex, k))
        for ex in examples:
            gold, rng = golds[ex.id], random.Random(f"{seed}|prmu|{ex.id}")
            items = retriever.select(ex, k)
            prompt = build_messages(ex, items, style=style)
            chosen = _synthetic_response(dw.make_chain(task, ex, items, gold, rng), gold)
            blind = next(iter(dw.blind_answers(ex).values()))
            common = dict(source="synthetic", user=ex.user, task=task, example_id=ex.id, prompt=prompt)
            sets["PRP"].append(PreferencePair(
                id=f"PRP/{ex.id}", set="PRP", chosen=chosen,
                rejected=_synthetic_response(dw.make_chain(task, ex, [], blind, rng), blind), **common))
            better = lambda a: reward_fn(task, a, gold) < reward_fn(task, gold, gold)  # noqa: E731  (strictly)
            # (a) quality: the same profile-reading chain program arguing for a worse answer
            wrong = blind if better(blind) else (
                rng.choice([x for x in LABELS[task] if x != gold]) if task in LABELS else None)
            if wrong is not None and better(wrong):  # a generation task whose blind answer ties the gold has none
                sets["PQP"].append(PreferencePair(
                    id=f"PQP/{ex.id}", set="PQP", chosen=chosen,
                    rejected=_synthetic_response(dw.make_chain(task, ex, items, wrong, rng), wrong), **common))
            # (c) style, before (b) can skip the question: the gold argued concisely vs thoroughly, over no items
            liked = world.reasoning_styles.get(ex.user)  # DemoWorld.load checked every value; a user may lack one
            if liked is None:
                raise DataError(f"{world.root / dw.MANIFEST}: field 'reasoning_styles': user {ex.user!r} (of {task} "
                                f"question {ex.id}) has style {liked!r}; known: {', '.join(dw.REASONING_STYLES)}")
            wording = f"{seed}|prmu-style|{ex.id}"
            by_style = {name: _synthetic_response(
                dw.make_chain(task, ex, [], gold, random.Random(wording), segments=n), gold)
                for name, n in dw.REASONING_STYLES.items()}
            disliked = next(name for name in by_style if name != liked)
            sets["style"].append(PreferencePair(
                id=f"style/{ex.id}", set="style", chosen=by_style[liked], rejected=by_style[disliked],
                **{**common, "prompt": build_messages(ex, [], style=style)}))
            # (b) whose answer: the user's gold vs the answer another user would give to this very query -- that
            # user's actual gold in the world's user-dependent groups, else the profile-aware heuristic over
            # another user's history. One chain that does not restate the profile, worded alike for both, so the
            # responses differ only in the answer and which wins depends on who is asking.
            user_dependent = ex.id in other_golds
            if user_dependent:
                candidates = other_golds[ex.id]
            else:
                others = [u for u in history if u != ex.user]
                candidates = [dw.aware_answer(ex, history[u]) for u in rng.sample(others, len(others))]
            theirs = next((a for a in candidates if better(a)), None)
            if theirs is None:
                continue
            wording = f"{seed}|prmu-user|{ex.id}"
            sets["PQP"].append(PreferencePair(
                id=f"PQP/{ex.id}/user", set="PQP", user_dependent=user_dependent,
                chosen=_synthetic_response(dw.make_chain(task, ex, [], gold, random.Random(wording)), gold),
                rejected=_synthetic_response(dw.make_chain(task, ex, [], theirs, random.Random(wording)), theirs),
                **common))
    if max_per_set > 0:
        for name, pairs in sets.items():
            if len(pairs) > max_per_set:
                keep = set(random.Random(f"{seed}|{name}").sample(range(len(pairs)), max_per_set))
                sets[name] = [p for i, p in enumerate(pairs) if i in keep]
    return sets


def _synthetic_response(chain: str, answer: str) -> Response:
    return Response(text=format_response(chain, answer), chain=chain, answer=answer)


# ---------------------------------------------------------------------------------------------------------------
# 5. Held-out split
# ---------------------------------------------------------------------------------------------------------------
def split_heldout(pairs: list[PreferencePair], heldout_frac: float, seed: int = 0,
                  linked: Iterable[Iterable[str]] = ()):
    """(train, heldout) split by query, so no query of a held-out pair is seen in training.

    A query is an example id, except that the ids of one `linked` group (questions that share one input across
    users, e.g. the demo world's `user_dependent_groups`) count as one query and go to the same side: otherwise a
    held-out pair would have its mirror image in training (the same input, the opposite preference, another user)
    and the held-out score would measure memorised inputs rather than what the model knows about the user."""
    root: dict[str, str] = {}  # union-find: groups sharing an id are one query; a component's root is its min id

    def key(example_id: str) -> str:
        while root.get(example_id, example_id) != example_id:
            example_id = root[example_id]
        return example_id

    for group in linked:
        tops = {key(i) for i in group}
        for t in tops:
            root[t] = min(tops)
    ids = sorted({key(p.example_id) for p in pairs})
    random.Random(seed).shuffle(ids)
    n_held = max(1, round(heldout_frac * len(ids))) if heldout_frac > 0 else 0
    held = set(ids[:n_held])
    return ([p for p in pairs if key(p.example_id) not in held], [p for p in pairs if key(p.example_id) in held])


# ---------------------------------------------------------------------------------------------------------------
# 6. Command line
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Write prp.jsonl and pqp.jsonl (and style.jsonl from a demo world) into --out-dir, from rollout files or
    from a demo world."""
    parser = argparse.ArgumentParser(prog="python -m minitagpr.data.preferences", description=main.__doc__)
    sub = parser.add_subparsers(dest="source", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter
    roll = sub.add_parser("from-rollouts", help="PRP/PQP pairs from rollout JSONL (recipes/prmu_rollouts.py)",
                          formatter_class=defaults)
    roll.add_argument("rollouts", nargs="+", help="rollout JSONL files written by recipes/prmu_rollouts.py")
    roll.add_argument("--max-per-example", type=int, default=2, help="most pairs of each set per question")
    demo = sub.add_parser("demo", help="synthetic PRP/PQP/style pairs from a demo world folder (no policy)",
                          formatter_class=defaults)
    demo.add_argument("world", help="a demo world folder (python -m minitagpr.data.demo_world)")
    demo.add_argument("--max-per-set", type=int, default=0, help="keep a seeded random subset per set (0: all)")
    for p in (roll, demo):
        p.add_argument("--out-dir", required=True, default=argparse.SUPPRESS, help="where prp.jsonl, pqp.jsonl (and style.jsonl) go")
        p.add_argument("--seed", type=int, default=0, help="seed of the pair choices and subsets")
    args = parser.parse_args(argv)
    if getattr(args, "max_per_set", 0) < 0:  # (--max-per-example is checked by build_pairs_from_rollouts)
        parser.error(f"--max-per-set must be >= 0 (0 = no cap), got {args.max_per_set}")
    try:
        cut_pairs = {}
        if args.source == "from-rollouts":
            built = build_pairs_from_rollouts(args.rollouts, args.max_per_example, args.seed)
            sets, cut_pairs = built.sets, built.cut_pairs
            where = ", ".join(args.rollouts)
            for line in built.summary():  # before any error below: what was left out is said either way
                print(line)
        else:
            sets = synthesize_demo_pairs(args.world, max_per_set=args.max_per_set, seed=args.seed)
            where = args.world
        for name, pairs in sets.items():
            if not pairs:
                cut = (f"; {cut_pairs[name]} candidate pairs were left out because a response was cut by the "
                       f"length limit: raise max_new_tokens of recipes/prmu_rollouts.py") if cut_pairs.get(name) else ""
                raise PreferenceDataError(f"{where}: no {name} pairs could be built (PRP needs both 'profile' and "
                                          f"'no_profile' records of a query; PQP needs responses of unequal R_v)"
                                          f"{cut}")
        out = Path(args.out_dir)
        check_writable_dir(out, "--out-dir")  # a file in its way is named as one (created only for pairs to write)
        for name, pairs in sets.items():
            write_pairs(out / f"{name.lower()}.jsonl", pairs)
            print(f"{name}: {len(pairs)} pairs -> {out / (name.lower() + '.jsonl')}")
    except (PreferenceDataError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a disk that fills up while writing
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
