"""SFT data: tagged-chain records -> token ids with the prompt masked -> packed fixed-length rows -> step batches.

The pipeline, each step a plain function:
    read_sft_records(path)                    JSONL records, validated (errors name file, line, id and field)
    tokenize_records(records, tok, path)      ids = prompt + `<think>\\n{chain}\\n</think>\\n\\n{answer}<|im_end|>`,
                                              mask True on the assistant target only
    pack_documents(docs, seq_len, ...)        rows of seq_len tokens; positions restart at 0 per document
                                              (the model keeps documents from attending to each other);
                                              targets = next token, -100 where the next token is prompt, padding,
                                              or in another document; a document longer than seq_len is an error
                                              (truncate_long=True: cut and counted; drop_long: left out)
    rows_for_step(step, ...)                  the global batch of row indices for one optimizer step
    rank_slice / micro_batches                this rank's share, split for gradient accumulation

Sampling order is a pure function of (seed, step): epoch e = step // steps_per_epoch uses permutation
randperm(num_rows) seeded with seed * 1_000_003 + e and takes consecutive slices of global_batch rows; the incomplete
tail of each epoch is dropped. The whole data position of a run is therefore its step counter: resuming at step s (an epoch boundary
included) continues the exact sequence with nothing skipped or repeated (the verl #7401 trap).
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from minitagpr.data.lamp import canonical_task, json_object_lines, not_a_file

IGNORE_INDEX = -100
REQUIRED_FIELDS = {"id": str, "task": str, "messages": list, "chain": str, "answer": str}


class DataError(ValueError):
    """Bad SFT data; the message names the file, the line (1-based), the record id and the field."""


@dataclass
class SftRecord:
    id: str
    user: str | None
    task: str
    messages: list[dict]
    chain: str
    answer: str
    line: int  # 1-based line in the source file, for error messages


@dataclass
class Document:
    ids: list[int]
    mask: list[bool]  # True where the token is a training target (assistant turn)
    id: str
    where: str = ""  # "file:line" of the source record, for error messages


@dataclass
class PackedRows:
    """Fixed-length training rows. Stored as int32 to halve memory; `batch()` returns int64 tensors."""

    input_ids: torch.Tensor  # (R, T) int32
    position_ids: torch.Tensor  # (R, T) int32, 0 at every document start; padding continues the last document
    targets: torch.Tensor  # (R, T) int32, next token or -100
    lengths: torch.Tensor  # (R,) int32, tokens before the row's trailing padding
    num_documents: int
    num_truncated: int  # documents cut to seq_len with truncate_long (their tail is lost; reported, never silent)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over every row's ids, positions and targets: a resumed run must find the same
        row behind every data index (equal counts over other records would silently mix two datasets)."""
        h = hashlib.sha256()
        for t in (self.input_ids, self.position_ids, self.targets):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def batch(self, rows: list[int], device=None) -> dict[str, torch.Tensor]:
        """The rows as int64 tensors (b, t), cut after the longest row's last real token: trailing padding only
        predicts -100 and, attention being causal, no real token sees it, so dropping it changes nothing but cost."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        t = int(self.lengths[idx].max())
        return {k: getattr(self, k)[idx, :t].to(device=device, dtype=torch.long)  # (b, t) int64 each
                for k in ("input_ids", "position_ids", "targets")}


# ----------------------------------------------------------------------------------------------- records
def read_sft_records(path: str | Path) -> list[SftRecord]:
    """Every record of an SFT JSONL file (`{"id", "user", "task", "messages", "chain", "answer"}` per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SFT data file {path}: {not_a_file(path)}")
    records: list[SftRecord] = []
    first_line: dict[str, int] = {}  # record id -> line
    for line_no, obj in json_object_lines(path, lambda n, what: DataError(f"{path}:{n}: {what}")):
        rec = _record(obj, path, line_no)
        if rec.id in first_line:  # a repeated id would train twice and hide which record a report names
            raise DataError(f"{path}:{line_no}: record id {rec.id!r} repeats the id of line {first_line[rec.id]}")
        first_line[rec.id] = line_no
        records.append(rec)
    if not records:
        raise DataError(f"SFT data file {path} holds no records")
    return records


def _record(obj, path: Path, line_no: int) -> SftRecord:
    where = f"{path}:{line_no}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", "?")
    where = f"{where} (record id {rid!r})"
    for name, kind in REQUIRED_FIELDS.items():
        if name not in obj:
            raise DataError(f"{where}: missing field '{name}'")
        if not isinstance(obj[name], kind):
            raise DataError(f"{where}: field '{name}' must be {kind.__name__}, got {type(obj[name]).__name__}")
    user = obj.get("user")
    if user is not None and (not isinstance(user, (str, int)) or isinstance(user, bool)):
        raise DataError(f"{where}: field 'user' must be a string or null, got {type(user).__name__}")
    if not obj["messages"]:
        raise DataError(f"{where}: field 'messages' is empty")
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field 'messages[{i}]' must be an object with string 'role' and 'content'")
    if obj["messages"][-1]["role"] != "user":  # the chain + answer are the assistant's reply to the last turn
        raise DataError(f"{where}: field 'messages' must end with a user turn, got {obj['messages'][-1]['role']!r}")
    for name in ("chain", "answer"):  # the targets: an empty one teaches the model to skip it
        if not obj[name].strip():
            raise DataError(f"{where}: field '{name}' is empty: SFT would teach an empty {name} after this prompt")
    try:
        canonical_task(obj["task"])
    except ValueError as e:
        raise DataError(f"{where}: field 'task': {e}") from None
    return SftRecord(id=str(rid), user=None if user is None else str(user), task=obj["task"],
                     messages=obj["messages"], chain=obj["chain"], answer=obj["answer"], line=line_no)


def tokenize_records(records: list[SftRecord], tokenizer, path: str | Path = "<records>") -> list[Document]:
    """ids + target mask per record via `tokenizer.encode_prompt_and_target` (thinking on)."""
    docs = []
    for r in records:
        try:
            ids, mask = tokenizer.encode_prompt_and_target(r.messages, r.chain, r.answer)
        except ValueError as err:
            raise DataError(f"{path}:{r.line} (record id {r.id!r}): cannot tokenize: {err}") from None
        docs.append(Document(ids=list(ids), mask=list(mask), id=r.id, where=f"{path}:{r.line}"))
    return docs


# ----------------------------------------------------------------------------------------------- packing
def document_targets(ids: list[int], mask: list[bool]) -> list[int]:
    """targets[i] = ids[i+1] where token i+1 is a training target, else -100; the last token predicts nothing
    (its successor belongs to another document or to padding)."""
    out = [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)]
    return out + [IGNORE_INDEX]


def pack_documents(docs: list[Document], seq_len: int, pad_id: int, *, pack: bool = True,
                   shuffle_seed: int | None = 0, truncate_long: bool = False) -> PackedRows:
    """Greedy packing into rows of exactly `seq_len` tokens.

    Documents are visited in a seeded shuffled order (so rows mix tasks and users; None keeps file order) and
    appended to the current row while they fit; otherwise the row is closed and padded. `pack=False` puts one
    document per row (a batch of B rows is then exactly B examples, as in the paper's "global batch 64").
    A document longer than seq_len is an error naming it (`too_long_error`): cut, its target would lose its end --
    `</think>`, the answer, `<|im_end|>` -- and SFT would teach chains that never finish. With `truncate_long`
    it is cut to seq_len instead and counted in `num_truncated`.
    Documents with no target token left are an error (nothing to learn from them).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not truncate_long:
        too_long = [d for d in docs if len(d.ids) > seq_len]
        if too_long:
            raise too_long_error(too_long, len(docs), seq_len)
    order = list(range(len(docs)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    rows_ids, rows_pos, rows_tgt, lengths = [], [], [], []
    cur_ids: list[int] = []
    cur_pos: list[int] = []
    cur_tgt: list[int] = []
    truncated = 0

    def close_row() -> None:
        pad = seq_len - len(cur_ids)
        lengths.append(len(cur_ids))
        rows_ids.append(cur_ids + [pad_id] * pad)
        # padding continues the last document's positions: a row holding one document stays one document (the
        # model's plain causal path); causal attention keeps every real token from seeing the padding after it
        rows_pos.append(cur_pos + list(range(cur_pos[-1] + 1, cur_pos[-1] + 1 + pad)))
        rows_tgt.append(cur_tgt + [IGNORE_INDEX] * pad)
        cur_ids.clear(), cur_pos.clear(), cur_tgt.clear()

    for i in order:
        doc = docs[i]
        ids, mask = doc.ids, doc.mask
        if len(ids) > seq_len:
            ids, mask, truncated = ids[:seq_len], mask[:seq_len], truncated + 1
        tgt = document_targets(ids, mask)
        if all(t == IGNORE_INDEX for t in tgt):
            prompt_len = doc.mask.index(True) if True in doc.mask else len(doc.ids)
            raise DataError(f"{doc.where} (record id {doc.id!r}): no target tokens within seq_len={seq_len} "
                            f"(prompt {prompt_len} of {len(doc.ids)} tokens); raise seq_len or shorten the prompt")
        if cur_ids and (not pack or len(cur_ids) + len(ids) > seq_len):
            close_row()
        cur_ids += ids
        cur_pos += range(len(ids))
        cur_tgt += tgt
    if cur_ids:
        close_row()
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.int32)  # noqa: E731
    return PackedRows(as_tensor(rows_ids), as_tensor(rows_pos), as_tensor(rows_tgt),  # (R, T) each
                      lengths=torch.tensor(lengths, dtype=torch.int32),  # (R,)
                      num_documents=len(docs), num_truncated=truncated)


def drop_long(docs: list[Document], seq_len: int) -> tuple[list[Document], list[Document]]:
    """(documents that fit in seq_len, documents longer than it), each in file order: SFT's `drop_long=true`, which
    trains without the second list (and writes it out) instead of stopping on its first entry."""
    return [d for d in docs if len(d.ids) <= seq_len], [d for d in docs if len(d.ids) > seq_len]


def too_long_error(too_long: list[Document], total: int, seq_len: int) -> DataError:
    """One line: how many documents exceed seq_len, and the first of them by file, record id and lengths."""
    doc = too_long[0]
    prompt = doc.mask.index(True) if True in doc.mask else len(doc.ids)
    where = f"{doc.where} " if doc.where else ""
    return DataError(f"{len(too_long)} of {total} documents are longer than seq_len={seq_len} tokens; the first: "
                     f"{where}(record id {doc.id!r}): {len(doc.ids)} tokens = prompt {prompt} + target "
                     f"{len(doc.ids) - prompt}. Cut, its target would lose </think>, the answer and <|im_end|>: raise "
                     f"seq_len, set drop_long=true to leave such records out (listed), or truncate_long=true to cut "
                     "them anyway (counted)")


# ----------------------------------------------------------------------------------------------- order
def steps_per_epoch(num_rows: int, global_batch: int, what: str = "packed rows",
                    fix: str = "lower global_batch or seq_len, or add data") -> int:
    """Optimizer steps in one epoch (the incomplete tail batch is dropped)."""
    if num_rows < global_batch:
        raise DataError(f"only {num_rows} {what} but global_batch={global_batch}: {fix}")
    return num_rows // global_batch


def batch_split_hint(global_batch: int, micro_batch: int, world_size: int) -> str:
    """How to make global_batch split into micro-batches of micro_batch on each of world_size ranks, for an error
    message: a micro_batch that fits (it changes memory use only, not the result), or why none does."""
    per_rank, rem = divmod(global_batch, world_size)
    if rem or not per_rank:
        return f"global_batch must be a multiple of the {world_size} ranks (a new value changes the result)"
    return f"micro_batch={math.gcd(micro_batch, per_rank)} fits (it changes memory use only, not the result)"


def row_flops(rows: PackedRows, document_flops) -> list[float]:
    """Training FLOPs of each packed row without the LM head: `document_flops(lengths)` (the model's) of the row's
    documents, each at the attention cost of its own length (documents start where position_ids is 0); the row's
    padding is not counted."""
    out = []
    for r in range(rows.num_rows):
        n = int(rows.lengths[r])
        starts = (rows.position_ids[r, :n] == 0).nonzero().flatten()  # (D,) document starts
        out.append(document_flops(torch.diff(torch.cat([starts, torch.tensor([n])]))))  # (D,) document lengths
    return out


def rows_for_step(step: int, num_rows: int, global_batch: int, seed: int) -> list[int]:
    """Row indices of the global batch of optimizer step `step` (0-based), a pure function of its arguments."""
    spe = steps_per_epoch(num_rows, global_batch)
    epoch, k = divmod(step, spe)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # one fixed permutation per (seed, epoch)
    perm = torch.randperm(num_rows, generator=g)
    return perm[k * global_batch:(k + 1) * global_batch].tolist()


def rank_slice(rows: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (global_batch must divide by world_size)."""
    if len(rows) % world_size:
        raise ValueError(f"global batch of {len(rows)} rows does not split over {world_size} ranks")
    per = len(rows) // world_size
    return rows[rank * per:(rank + 1) * per]


def micro_batches(rows: list[int], micro_batch: int) -> list[list[int]]:
    """Split a rank's rows into gradient-accumulation micro-batches of `micro_batch` rows."""
    if len(rows) % micro_batch:
        raise ValueError(f"{len(rows)} rows per rank do not split into micro-batches of {micro_batch}")
    return [rows[i:i + micro_batch] for i in range(0, len(rows), micro_batch)]
