"""Reward scoring cost for one guided-RL batch: 128 prompts x G = 5 = 640 responses of ~1,000 words, every rule-based
component (R_v, R_f, R_rep, R_tag; PRMU is a model and has its own benchmark), on one CPU core.

    python bench/rewards.py [--prompts 128] [--group 5] [--words 1000] [--repeats 5]

Baselines measured in the same run: the same batch with R_v computed by rouge-score's own `RougeScorer` (its LCS is
an O(n*m) Python table) instead of our bit-parallel LCS, everything else equal; R_v alone both ways; and a 1 MB
response (ours: every component; baseline: rouge-score's R_v alone). Other rows time one component each.
Times are medians of `--repeats` runs after one warm-up, wall and CPU (the process is pinned to one core; on a shared
box CPU time is the steadier number); peak memory is the tracemalloc peak of Python allocations during one extra run.
Responses are synthetic but shaped like the policy's: a tagged chain of 3-6 segments (~95% of the words) and an
answer (a label, or 8-30 words for generation tasks), in the paper's task mix.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rouge_score import rouge_scorer  # noqa: E402

from minitagpr import rewards  # noqa: E402
from minitagpr.data.answers import LABELS, is_classification  # noqa: E402
from timing import median_seconds, python_peak_mb, machine_line  # noqa: E402

# Guided-RL task mix of the paper: 1,024 examples each of LaMP-1, 3, 4, 5, 7 and 3,200 of LaMP-2.
TASK_MIX = {"LaMP-1": 1024, "LaMP-2": 3200, "LaMP-3": 1024, "LaMP-4": 1024, "LaMP-5": 1024, "LaMP-7": 1024}
VOCAB = [f"w{i}" for i in range(3000)] + "the a of to and in is that user profile item rating tag".split()


def make_batch(prompts: int, group: int, words: int, seed: int = 0):
    rng = random.Random(seed)
    weights = [rng.paretovariate(1.2) for _ in VOCAB]  # heavy-tailed word frequencies, like prose
    tasks, responses, golds = [], [], []
    for _ in range(prompts):
        task = rng.choices(list(TASK_MIX), weights=list(TASK_MIX.values()))[0]
        gold = rng.choice(LABELS[task]) if is_classification(task) else " ".join(rng.choices(VOCAB, weights, k=10))
        for _ in range(group):
            n_seg = rng.randint(3, 6)
            per_seg = max(1, int(words * 0.95) // n_seg)
            chain = "\n".join(f"<{t}>\n{' '.join(rng.choices(VOCAB, weights, k=per_seg))}\n</{t}>"
                              for t in rng.choices(rewards.TAGS, k=n_seg))
            answer = rng.choice(LABELS[task]) if is_classification(task) else " ".join(
                rng.choices(VOCAB, weights, k=rng.randint(8, 30)))
            tasks.append(task)
            responses.append(f"<think>\n{chain}\n</think>\n\n{answer}<|im_end|>")
            golds.append(gold)
    return tasks, responses, golds


def library_rouge_batch(tasks, responses, golds):
    """The baseline: score_batch's components with R_v from rouge-score's RougeScorer."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    out = []
    for task, response, gold in zip(tasks, responses, golds):
        chain, answer = rewards.split_response(response)
        if is_classification(task):
            r_v = rewards.verifiable_reward(task, answer, gold)
        else:
            r_v = scorer.score(gold, answer)["rougeL"].fmeasure
        out.append((r_v, rewards.format_reward(response), rewards.repetition_reward(response),
                    rewards.tag_reward(chain)))
    return out


def naive_repetition(response: str, n: int = 4) -> float:
    """The R_rep formula written the plain way: a list of n-gram tuples built index by index, then its set."""
    for marker in ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        response = response.replace(marker, " ")
    words = response.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return -(len(grams) - len(set(grams))) / (len(grams) + 1e-6) if grams else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--group", type=int, default=5)
    parser.add_argument("--words", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the acceptance asks

    tasks, responses, golds = make_batch(args.prompts, args.group, args.words)
    n = len(responses)
    n_words = sum(len(r.split()) for r in responses)
    chains = [rewards.split_response(r)[0] for r in responses]
    answers = [rewards.split_response(r)[1] for r in responses]
    segment = f"<{rewards.TAGS[0]}>x</{rewards.TAGS[0]}>"
    big_text = " ".join(random.Random(1).choices(VOCAB, k=200_000))[: 1 << 20]  # 1 MB of words
    big = f"<think>\n{segment * 3}</think>\n{big_text}"  # a short chain, then a 1 MB answer

    assert all(naive_repetition(r) == rewards.repetition_reward(r) for r in responses[:50])  # the same numbers
    library_rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    big_gold = golds[tasks.index("LaMP-4")] if "LaMP-4" in tasks else "a short headline"
    big_answer = rewards.split_response(big)[1]
    # (name, fn, baseline row name or None); a baseline row is its own reference
    rows = [
        ("baseline: batch with R_v by rouge-score", lambda: library_rouge_batch(tasks, responses, golds), None),
        ("score_batch (R_v, R_f, R_rep, R_tag)",
         lambda: rewards.score_batch(tasks, responses, golds, mix="composite", gamma=0.0),
         "baseline: batch with R_v by rouge-score"),
        ("baseline: R_v only, rouge-score", lambda: [
            rewards.verifiable_reward(t, a, g) if is_classification(t) else library_rouge.score(g, a)["rougeL"].fmeasure
            for t, a, g in zip(tasks, answers, golds)], None),
        ("R_v only (verifiable_reward)",
         lambda: [rewards.verifiable_reward(t, a, g) for t, a, g in zip(tasks, answers, golds)],
         "baseline: R_v only, rouge-score"),
        ("R_f only (format_reward)", lambda: [rewards.format_reward(r) for r in responses], None),
        ("baseline: R_rep, 4-gram list + set, markers stripped", lambda: [naive_repetition(r) for r in responses],
         None),
        ("R_rep only (repetition_reward)", lambda: [rewards.repetition_reward(r) for r in responses],
         "baseline: R_rep, 4-gram list + set, markers stripped"),
        ("R_tag only (tag_reward)", lambda: [rewards.tag_reward(c) for c in chains], None),
        ("baseline: 1 MB answer, R_v by rouge-score",
         lambda: library_rouge.score(big_gold, big_answer)["rougeL"].fmeasure, None),
        ("1 MB response, LaMP-4, score_batch",
         lambda: rewards.score_batch(["LaMP-4"], [big], [big_gold], mix="foundation"),
         "baseline: 1 MB answer, R_v by rouge-score"),
    ]
    print(f"{n} responses ({args.prompts} prompts x G = {args.group}), mean {n_words / n:.0f} words, one core, "
          f"median of {args.repeats}")
    print("| path | wall s | CPU s | responses/s (CPU) | speed-up vs its baseline (CPU) | peak Python MB |")
    print("|---|---|---|---|---|---|")
    seconds_of = {}
    for name, fn, baseline in rows:
        wall, seconds = median_seconds(fn, args.repeats, cpu=True)  # one core: CPU time is the steadier number
        seconds_of[name] = seconds
        ratio = "1.00x" if name.startswith("baseline") else (
            f"{seconds_of[baseline] / seconds:.2f}x" if baseline else "-")
        rate = "-" if "1 MB" in name else f"{n / seconds:,.0f}"
        print(f"| {name} | {wall:.3f} | {seconds:.3f} | {rate} | {ratio} | {python_peak_mb(fn):.1f} |")


if __name__ == "__main__":
    main()
