"""Data-layer benchmark: reading + validation, retrieval, prompt budgeting and metrics, each with a baseline.

    python bench/data_layer.py [--questions 200] [--items 100] [--repeats 5]

Baselines measured in the same run: plain `json.load` for the reader (what validation costs on top), a
whole-document Counter BM25 (the obvious implementation) for our query-term-only BM25, dropping one item at a time
for the budgeted prompt (Qwen3 tokenizer from ../shared when present; every tokenizer call tokenises a whole
prompt, which dominates the cost), and the official metrics' libraries (`rouge_score`, scikit-learn; test extras,
rows left out without them) for `minitagpr.metrics`. Peak Python memory (tracemalloc) of one call per row.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minitagpr.data.lamp import LampExample, item_document, load_questions, query_text, write_questions  # noqa: E402
from minitagpr.data.prompts import build_messages, fit_messages  # noqa: E402
from minitagpr.data.retrieval import get_retriever, tokenize  # noqa: E402
from minitagpr.metrics import evaluate  # noqa: E402
from timing import median_seconds, python_peak_mb, machine_line  # noqa: E402

WORDS = [f"w{i}" for i in range(3000)]


def make_lamp4(n_questions: int, n_items: int, rng: random.Random) -> list[LampExample]:
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    return [LampExample(str(q), "LaMP-4", f"Generate a headline for the following article: {text(80)}",
                        [{"id": f"{q}{j}", "text": text(120), "title": text(8), "date": f"2016-01-{1 + j % 28:02d}"}
                         for j in range(n_items)]) for q in range(n_questions)]


def bm25_whole_counter(example: LampExample, k: int, k1: float = 1.5, b: float = 0.75) -> list[dict]:
    """Baseline: count every token of every document, then score."""
    query = tokenize(query_text(example))
    docs = [tokenize(item_document(example.task, it)) for it in example.profile]
    tfs = [Counter(d) for d in docs]
    df = Counter(t for tf in tfs for t in tf)
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    scores = [sum(math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * tf[t] * (k1 + 1)
                  / (tf[t] + k1 * (1 - b + b * len(d) / avgdl)) for t in query) for d, tf in zip(docs, tfs)]
    order = sorted(range(n), key=lambda j: -scores[j])
    return [example.profile[j] for j in order[:k]]


def trim_linearly(example, items, tokenizer, budget):
    """Baseline: drop the last item until the prompt fits (one tokenizer call per try)."""
    for n in range(len(items), -1, -1):
        msgs = build_messages(example, items[:n])
        if len(tokenizer.apply_chat(msgs, add_generation_prompt=True, enable_thinking=True)) <= budget:
            return msgs, n
    raise ValueError("query alone does not fit")


class CountingTokenizer:
    """Counts apply_chat calls (each one tokenises a whole prompt)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def apply_chat(self, messages, **kwargs):
        self.calls += 1
        return self.tok.apply_chat(messages, **kwargs)


def row(name, seconds, per, baseline=None, extra=""):
    ratio = f"{baseline / seconds:.3g}x" if baseline else "1.00x (baseline)"
    return f"| {name} | {seconds * 1e3:.1f} | {seconds / per * 1e6:.0f} | {ratio} | {extra} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(machine_line())
    rng = random.Random(0)
    examples = make_lamp4(args.questions, args.items, rng)
    n, r = len(examples), args.repeats

    with tempfile.TemporaryDirectory() as tmp:
        path = write_questions(Path(tmp) / "dev_questions.json", examples)
        size_mb = path.stat().st_size / 2**20
        print(f"\nreader: {n} LaMP-4 questions x {args.items} items, file {size_mb:.1f} MB, median of {r}")
        print("| path | ms | us/question | speed vs baseline | peak Python MB |")
        print("|---|---|---|---|---|")
        t_json = median_seconds(lambda: json.load(open(path, encoding="utf-8")), r)
        t_ours = median_seconds(lambda: load_questions(path, "LaMP-4"), r)
        print(row("json.load only", t_json, n, extra=f"{python_peak_mb(lambda: json.load(open(path))):.0f}"))
        print(row("load_questions (validated)", t_ours, n, t_json,
                  f"{python_peak_mb(lambda: load_questions(path, 'LaMP-4')):.0f}"))

    k = 8
    print(f"\nretrieval: k={k}, {args.items}-item profiles, {n} examples, median of {r}")
    print("| retriever | ms | us/example | speed vs baseline | peak Python MB |")
    print("|---|---|---|---|---|")
    base_fn = lambda: [bm25_whole_counter(ex, k) for ex in examples]  # noqa: E731
    t_base = median_seconds(base_fn, r)
    bm25 = get_retriever("bm25")
    assert all([it["id"] for it in bm25.select(ex, k)] == [it["id"] for it in bm25_whole_counter(ex, k)]
               for ex in examples[:20])
    print(row("bm25, whole-document Counter", t_base, n, extra=f"{python_peak_mb(base_fn):.1f}"))
    for name in ("bm25", "recency", "random"):
        ret = get_retriever(name)
        fn = lambda: [ret.select(ex, k) for ex in examples]  # noqa: E731
        line = row(f"{name} (ours)", median_seconds(fn, r), n, t_base, f"{python_peak_mb(fn):.1f}")
        if name != "bm25":  # they score nothing: a ratio to a BM25 baseline would be no speed-up of anything
            line = line.replace(line.split(" | ")[3], "- (no scoring: not comparable)")
        print(line)

    # Budgeted prompts: each tokenizer call tokenises a whole prompt, so use fewer examples and a larger k.
    kp, pex = 16, examples[: max(1, n // 5)]
    items = [get_retriever("recency").select(ex, kp) for ex in pex]
    print(f"\nprompts: k={kp}, {len(pex)} examples, median of {r}")
    t_plain = median_seconds(lambda: [build_messages(ex, it) for ex, it in zip(pex, items)], r)
    print(f"build_messages without a budget: {t_plain * 1e3:.1f} ms ({t_plain / len(pex) * 1e6:.0f} us/example)")
    tok_dir = REPO.parent / "shared" / "assets" / "qwen3-tokenizer"
    if tok_dir.exists():
        from minitagpr.tokenizer import Tokenizer
        tok = CountingTokenizer(Tokenizer.from_dir(tok_dir))
        full = [len(tok.apply_chat(build_messages(ex, it), add_generation_prompt=True)) for ex, it in zip(pex, items)]
        print(f"unbudgeted prompts: {statistics.mean(full):.0f} Qwen3 tokens on average")
        print("| budget | path | ms | us/example | speed vs baseline | items kept, tokenizer calls/example |")
        print("|---|---|---|---|---|---|")
        for budget in (8192, 2048):
            for name, fn in (("drop one at a time", trim_linearly), ("fit_messages (binary search)", fit_messages)):
                tok.calls = 0
                kept = [fn(ex, it, tok, budget)[1] for ex, it in zip(pex, items)]
                calls = tok.calls / len(pex)
                t = median_seconds(lambda: [fn(ex, it, tok, budget) for ex, it in zip(pex, items)], r)
                if fn is trim_linearly:
                    t_lin = t
                print(f"| {budget} " + row(name, t, len(pex), None if fn is trim_linearly else t_lin,
                                           f"{statistics.mean(kept):.1f} of {kp}, {calls:.1f}"))

    golds = {ex.id: " ".join(rng.choice(WORDS[:50]) for _ in range(10)) for ex in examples}
    preds = {i: " ".join(rng.choice(WORDS[:50]) for _ in range(10)) for i in golds}
    labels = {i: rng.choice(["[1]", "[2]"]) for i in golds}
    guesses = {i: rng.choice(["[1]", "[2]"]) for i in golds}
    print(f"\nmetrics: {n} examples, median of {r}")
    print("| metric | path | ms | us/example | speed vs baseline | peak Python MB |")
    print("|---|---|---|---|---|---|")
    for metric, ours, baseline in (
            ("LaMP-4 rouge1 + rougeL", lambda: evaluate("LaMP-4", preds, golds), official_rouge(preds, golds)),
            ("LaMP-1 acc + F1 + macro-F1", lambda: evaluate("LaMP-1", guesses, labels),
             official_labels(guesses, labels))):
        t_base = None
        if baseline is not None:
            t_base = median_seconds(baseline[1], r)
            print(f"| {metric} " + row(baseline[0], t_base, n, extra=f"{python_peak_mb(baseline[1]):.1f}"))
        print(f"| {metric} " + row("minitagpr.metrics.evaluate", median_seconds(ours, r), n, t_base,
                                   f"{python_peak_mb(ours):.1f}"))


def official_rouge(preds: dict, golds: dict):
    """(name, fn) of ROUGE-1 + ROUGE-L F by `rouge_score` (the official script's library), or None without it.
    minitagpr.metrics calls the same library, so this ratio shows only the overhead of its wrapper."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])

    def run():
        scores = [scorer.score(golds[i].strip(), preds[i].strip()) for i in golds]
        return [statistics.fmean(s[k].fmeasure for s in scores) for k in ("rouge1", "rougeL")]
    return "rouge_score (baseline)", run


def official_labels(preds: dict, golds: dict):
    """(name, fn) of accuracy, positive-class F1 and macro-F1 by scikit-learn, or None without it."""
    try:
        from sklearn.metrics import accuracy_score, f1_score
    except ImportError:
        return None
    ids = list(golds)

    def run():
        y, p = [golds[i].strip() for i in ids], [preds[i].strip() for i in ids]
        return (accuracy_score(y, p), f1_score(y, p, pos_label="[1]", average="binary"),
                f1_score(y, p, labels=["[1]", "[2]"], average="macro"))
    return "scikit-learn (baseline)", run


if __name__ == "__main__":
    main()
