"""SFT data: record validation, prompt masking, packing with per-document positions, and the step order."""
from __future__ import annotations

import json
import random

import pytest
import torch

from minitagpr.tokenizer import Tokenizer
from minitagpr.train import sft_data as S
from train_fixtures import sft_record, write_sft_data, write_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))


def random_docs(n, rng, max_len=30):
    docs = []
    for i in range(n):
        length = rng.randint(3, max_len)
        prompt = rng.randint(1, length - 1)
        docs.append(S.Document(ids=[rng.randint(5, 99) for _ in range(length)],
                               mask=[False] * prompt + [True] * (length - prompt), id=f"d{i}", where=f"f:{i + 1}"))
    return docs


# ----------------------------------------------------------------------------------------------- records
def test_records_round_trip_the_interface_format(tmp_path):
    path = write_sft_data(tmp_path / "d.jsonl", n=5)
    recs = S.read_sft_records(path)
    assert [r.id for r in recs] == [f"r{i}" for i in range(5)]
    assert recs[2].line == 3 and recs[2].messages == sft_record(2)["messages"]


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(S.DataError, match=r"SFT data file .*nope.jsonl: file not found"):
        S.read_sft_records(tmp_path / "nope.jsonl")
    with pytest.raises(S.DataError, match=r"SFT data file .*: is a folder, not a file"):
        S.read_sft_records(tmp_path)


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(sft_record(0)) + "\n{not json\n")
    with pytest.raises(S.DataError, match=r"d.jsonl:2: not valid JSON"):
        S.read_sft_records(path)


@pytest.mark.parametrize("field,value,message", [
    ("chain", None, "field 'chain' must be str"),
    ("messages", [], "field 'messages' is empty"),
    ("user", True, "field 'user' must be a string or null, got bool"),  # was kept as the user "True"
    ("messages", [{"role": "user"}], r"field 'messages\[0\]' must be an object"),
    ("chain", " \n", "field 'chain' is empty: SFT would teach an empty chain"),  # were trained on
    ("answer", "", "field 'answer' is empty: SFT would teach an empty answer"),
])
def test_bad_field_names_file_line_id_and_field(tmp_path, field, value, message):
    rec = dict(sft_record(1), **{field: value})
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(sft_record(0)) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(S.DataError, match=rf"d.jsonl:2 \(record id 'r1'\): {message}"):
        S.read_sft_records(path)


def test_missing_field_is_named(tmp_path):
    rec = sft_record(0)
    del rec["answer"]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(S.DataError, match=r"d.jsonl:1 \(record id 'r0'\): missing field 'answer'"):
        S.read_sft_records(path)


def test_untokenizable_chain_names_the_record(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(dict(sft_record(0), chain="a </think> b")) + "\n")
    with pytest.raises(S.DataError, match=r"d.jsonl:1 \(record id 'r0'\): cannot tokenize: chain contains </think>"):
        S.tokenize_records(S.read_sft_records(path), tok, path)


def test_prompt_is_masked_and_target_ends_with_im_end(tmp_path, tok):
    path = write_sft_data(tmp_path / "d.jsonl", n=1)
    rec = S.read_sft_records(path)[0]
    doc = S.tokenize_records([rec], tok, path)[0]
    prompt = tok.apply_chat(rec.messages, add_generation_prompt=True)
    assert doc.ids[:len(prompt)] == prompt and not any(doc.mask[:len(prompt)])
    assert all(doc.mask[len(prompt):]) and doc.ids[-1] == tok.im_end_id
    assert tok.decode(doc.ids[len(prompt):]).startswith("<think>\n<")


# ----------------------------------------------------------------------------------------------- packing
def test_targets_are_next_tokens_of_the_target_part_only():
    ids, mask = [10, 11, 12, 13, 14], [False, False, True, True, True]
    assert S.document_targets(ids, mask) == [-100, 12, 13, 14, -100]


def test_packed_rows_have_fixed_length_and_positions_restart_per_document():
    rng = random.Random(1)
    docs = random_docs(40, rng)
    rows = S.pack_documents(docs, seq_len=64, pad_id=0, shuffle_seed=3)
    assert rows.input_ids.shape == rows.targets.shape == rows.position_ids.shape == (rows.num_rows, 64)
    # every document appears once, whole, starting at position 0, with its own next-token targets
    found = []
    for r in range(rows.num_rows):
        n = int(rows.lengths[r])
        pos = rows.position_ids[r, :n].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [n]
        for a, b in zip(starts, starts[1:]):
            found.append((rows.input_ids[r, a:b].tolist(), rows.targets[r, a:b].tolist()))
        # the padding after the last document predicts nothing and continues its positions
        assert set(rows.input_ids[r, n:].tolist()) <= {0} and set(rows.targets[r, n:].tolist()) <= {-100}
        assert rows.position_ids[r, n:].tolist() == list(range(pos[-1] + 1, pos[-1] + 1 + 64 - n))
    by_ids = {tuple(d.ids): d for d in docs}
    assert sorted(tuple(f[0]) for f in found) == sorted(tuple(d.ids) for d in docs)
    for ids, tgt in found:
        assert tgt == S.document_targets(ids, by_ids[tuple(ids)].mask)


def test_no_target_crosses_a_document_boundary():
    docs = [S.Document([1, 2, 3], [False, True, True], "a"), S.Document([4, 5, 6], [False, True, True], "b")]
    rows = S.pack_documents(docs, seq_len=8, pad_id=0, shuffle_seed=None)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert rows.targets.tolist() == [[2, 3, -100, 5, 6, -100, -100, -100]]


def test_pack_false_puts_one_document_per_row():
    docs = random_docs(10, random.Random(2), max_len=8)
    rows = S.pack_documents(docs, seq_len=16, pad_id=0, pack=False)
    assert rows.num_rows == 10
    assert all(int((rows.position_ids[r] == 0).sum()) == 1 for r in range(10))
    assert sorted(rows.lengths.tolist()) == sorted(len(d.ids) for d in docs)


def test_a_document_longer_than_seq_len_is_an_error_naming_file_record_and_lengths():
    """Cut silently, a chain lost its </think>, answer and <|im_end|>: SFT taught chains that never finish."""
    docs = [S.Document([1, 2, 3], [False, True, True], "short", where="x.jsonl:1"),
            S.Document(list(range(1, 21)), [False] * 5 + [True] * 15, "long", where="x.jsonl:2"),
            S.Document(list(range(1, 11)), [False] * 2 + [True] * 8, "long2", where="x.jsonl:3")]
    with pytest.raises(S.DataError, match=r"2 of 3 documents are longer than seq_len=8 tokens; the first: x.jsonl:2 "
                                          r"\(record id 'long'\): 20 tokens = prompt 5 \+ target 15\..*truncate_long"):
        S.pack_documents(docs, seq_len=8, pad_id=0)


def test_with_truncate_long_long_documents_are_cut_and_counted():
    docs = [S.Document(list(range(1, 21)), [False] * 5 + [True] * 15, "long")]
    rows = S.pack_documents(docs, seq_len=8, pad_id=0, truncate_long=True)
    assert rows.num_truncated == 1 and rows.input_ids.tolist() == [list(range(1, 9))]


def test_drop_long_keeps_the_documents_that_fit_and_returns_the_others_in_file_order():
    docs = [S.Document(list(range(1, n + 1)), [False] + [True] * (n - 1), f"d{n}") for n in (9, 3, 8, 20)]
    kept, dropped = S.drop_long(docs, seq_len=8)
    assert [d.id for d in kept] == ["d3", "d8"] and [d.id for d in dropped] == ["d9", "d20"]  # exactly 8 fits


def test_a_document_exactly_seq_len_long_is_whole_not_an_error():
    docs = [S.Document(list(range(1, 9)), [False] * 2 + [True] * 6, "exact")]
    rows = S.pack_documents(docs, seq_len=8, pad_id=0)
    assert rows.num_truncated == 0 and rows.input_ids.tolist() == [list(range(1, 9))]


def test_document_without_targets_within_seq_len_is_an_error():
    docs = [S.Document(list(range(1, 21)), [False] * 15 + [True] * 5, "p", where="x.jsonl:7")]
    with pytest.raises(S.DataError, match=r"x.jsonl:7 \(record id 'p'\): no target tokens within seq_len=8"):
        S.pack_documents(docs, seq_len=8, pad_id=0, truncate_long=True)


def test_batch_returns_int64_rows_without_their_common_trailing_padding():
    docs = [S.Document([1, 2, 3], [False, True, True], "a"), S.Document([4, 5, 6, 7, 8], [False] + [True] * 4, "b")]
    rows = S.pack_documents(docs, seq_len=16, pad_id=0, pack=False, shuffle_seed=None)
    b = rows.batch([0, 1])
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in b.values())
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]]
    assert rows.batch([0])["targets"].tolist() == [[2, 3, -100]]


# ----------------------------------------------------------------------------------------------- order
def test_each_epoch_visits_distinct_rows_and_epochs_differ():
    num_rows, gb, seed = 37, 8, 5
    spe = S.steps_per_epoch(num_rows, gb)
    assert spe == 4
    epochs = [[r for s in range(e * spe, (e + 1) * spe) for r in S.rows_for_step(s, num_rows, gb, seed)]
              for e in range(3)]
    for rows in epochs:
        assert len(rows) == len(set(rows)) == spe * gb and all(0 <= r < num_rows for r in rows)
    assert epochs[0] != epochs[1] != epochs[2]


def test_the_order_is_a_seeded_permutation_per_epoch_whatever_the_step_a_run_starts_at():
    # resume relies on rows_for_step being a pure function of (step, rows, batch, seed): check it against its
    # definition -- epoch e = step // steps_per_epoch visits its own permutation, batch after batch -- at every step
    # around the epoch boundaries, each computed as a fresh process would (no state carried between calls)
    num_rows, gb, seed = 22, 4, 1  # 5 steps per epoch (2 rows dropped each epoch)
    spe = S.steps_per_epoch(num_rows, gb)
    for step in [0, 4, 5, 6, 9, 10, 14, 15, 16]:
        epoch, k = divmod(step, spe)
        rows = S.rows_for_step(step, num_rows, gb, seed)
        same_epoch = [r for s in range(epoch * spe, (epoch + 1) * spe) for r in S.rows_for_step(s, num_rows, gb, seed)]
        assert rows == same_epoch[k * gb:(k + 1) * gb] and len(set(same_epoch)) == spe * gb
    firsts = [S.rows_for_step(e * spe, num_rows, gb, seed) for e in range(3)]
    assert firsts[0] != firsts[1] != firsts[2]  # a resumed run at a boundary starts the next epoch's order


def test_order_depends_on_the_seed():
    assert S.rows_for_step(0, 50, 10, 0) != S.rows_for_step(0, 50, 10, 1)


def test_too_few_rows_for_one_batch_is_an_error():
    with pytest.raises(S.DataError, match="only 3 packed rows but global_batch=4"):
        S.steps_per_epoch(3, 4)


def test_rank_slices_and_micro_batches_partition_the_global_batch():
    rows = list(range(12))
    shares = [S.rank_slice(rows, r, 3) for r in range(3)]
    assert sum(shares, []) == rows
    assert S.micro_batches(shares[1], 2) == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="does not split over 5 ranks"):
        S.rank_slice(rows, 0, 5)


def test_documents_that_exactly_fill_a_row_share_it():  # pinned by mutation, 2026-11-27
    docs = [S.Document(ids=[1, 2, 3, 4], mask=[False, True, True, True], id=f"d{i}") for i in range(2)]
    rows = S.pack_documents(docs, seq_len=8, pad_id=0, shuffle_seed=None)
    assert rows.num_rows == 1 and int(rows.lengths[0]) == 8


def test_batch_arithmetic_edges():  # pinned by mutation, 2026-11-27
    assert S.steps_per_epoch(8, 8) == 1  # exactly one global batch of rows is one step
    with pytest.raises(ValueError, match="do not split into micro-batches of 2"):
        S.micro_batches([0, 1, 2], 2)


def test_row_flops_charge_each_document_its_own_attention_length():
    """MFU counted every token's attention at the mean row length (packed documents attend within themselves)."""
    docs = [S.Document([1, 2, 3], [False, True, True], "a"), S.Document([4, 5], [False, True], "b"),
            S.Document([6, 7, 8, 9], [False, True, True, True], "c")]
    rows = S.pack_documents(docs, seq_len=6, pad_id=0, pack=True, shuffle_seed=None)  # rows: [a b .], [c . .]
    assert rows.lengths.tolist() == [5, 4]
    cost = lambda n: 100.0 + n  # noqa: E731  (a per-token cost that grows with the attended length)
    documents = lambda lengths: sum(n * cost(n) for n in lengths.tolist())  # noqa: E731  (as a model's)
    assert S.row_flops(rows, documents) == [3 * cost(3) + 2 * cost(2), 4 * cost(4)]


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -------------------------------

def test_the_default_shuffle_seed_zero_shuffles_in_the_seeded_order():
    """shuffle_seed=0 (the default) is a seed like any other, not "no shuffle": documents are visited in the order
    random.Random(seed).shuffle gives; only None keeps file order. pack=False makes the visit order the row order."""
    docs = [S.Document(ids=[10 + i, 50 + i], mask=[False, True], id=f"d{i}") for i in range(8)]
    for seed in (0, 3):
        order = list(range(8))
        random.Random(seed).shuffle(order)
        assert order != list(range(8))
        rows = S.pack_documents(docs, seq_len=2, pad_id=0, pack=False, shuffle_seed=seed)
        assert rows.input_ids[:, 0].tolist() == [10 + i for i in order]
    assert S.pack_documents(docs, seq_len=2, pad_id=0, pack=False, shuffle_seed=None).input_ids[:, 0].tolist() == \
        [10 + i for i in range(8)]


def test_a_seq_len_below_two_is_refused_before_any_document_is_looked_at():
    """A row of one token has no next token to predict: seq_len=1 is refused as such, not reported as a document
    that is too long or has no targets."""
    docs = [S.Document(ids=[1, 2, 3], mask=[False, True, True], id="a")]
    for truncate_long in (False, True):
        with pytest.raises(ValueError, match="seq_len must be >= 2, got 1"):
            S.pack_documents(docs, seq_len=1, pad_id=0, truncate_long=truncate_long)


def test_the_fingerprint_tells_rows_of_another_seq_len_apart():
    """Two 4-token documents packed into one row of 8 or into two rows of 4 hold the same bytes (ids, positions
    0 1 2 3 0 1 2 3, targets): only the shape differs, and a resumed run with another seq_len must not match."""
    docs = [S.Document(ids=[1, 2, 3, 4], mask=[False, True, True, True], id=f"d{i}") for i in range(2)]
    one = S.pack_documents(docs, seq_len=8, pad_id=0, shuffle_seed=None)
    two = S.pack_documents(docs, seq_len=4, pad_id=0, shuffle_seed=None)
    assert (one.num_rows, two.num_rows) == (1, 2)
    assert one.input_ids.flatten().tolist() == two.input_ids.flatten().tolist()
    assert one.position_ids.flatten().tolist() == two.position_ids.flatten().tolist() == [0, 1, 2, 3] * 2
    assert one.fingerprint() != two.fingerprint()


def test_micro_batches_of_one_row_keep_every_row():
    """micro_batch=1 gives one micro-batch per row, the last one included."""
    assert S.micro_batches([4, 5, 6], 1) == [[4], [5], [6]]
