"""PRMU scoring throughput (the R_PRMU call of guided RL): our batched scorer vs transformers' sequence classifier.

Same weights (the "demo" preset with the demo world's tokenizer), same (user, prompt, response) triples taken from
the demo world's synthetic preference pairs, no grad. Paths:
  transformers       Qwen3ForSequenceClassification, right-padded batches of `--batch` in input order (no table;
                     its inputs are tokenized before the clock starts, ours inside the timed call)
  ours-no-table      PRMUScorer, table off: the same model and scores as transformers, but it sorts the sequences
                     by length before batching (less padding) and tokenizes inside the timed call
  ours-table         PRMUScorer with the user table (one extra soft token per sequence)
  ours-one-by-one    PRMU with the table, one sequence per forward (what an unbatched reward loop costs)
Timing runs every path in one process, interleaved round by round after one warm-up call each; "vs transformers" is
the median over rounds of the per-round speed ratio. Peak memory comes from a fresh subprocess per path: the growth
of the resident set (VmHWM, reset after a warm-up call) over one call.

    python bench/prmu_score.py [--n 64] [--batch 16] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import rss_growth_mb, machine_line

PATHS = ["transformers", "ours-no-table", "ours-table", "ours-one-by-one"]


def make_call(path: str, work: str, n: int, batch: int):
    """(call, sequences, tokens): a no-argument function scoring the first n PQP pairs' chosen responses one way."""
    import torch
    from minitagpr.data.preferences import read_pairs
    from minitagpr.model.reward import PRMUScorer, collate, encode_reward_input, load_reward_model
    from minitagpr.tokenizer import Tokenizer

    work = Path(work)
    pairs = read_pairs(work / "pairs.jsonl")[:n]
    tok = Tokenizer.from_dir(work / "rm")
    users = [p.user for p in pairs]
    prompts = [p.prompt for p in pairs]
    responses = [p.chosen.text for p in pairs]
    tokens = sum(len(encode_reward_input(tok, p, r)) for p, r in zip(prompts, responses))
    if path == "transformers":
        import transformers
        model = transformers.Qwen3ForSequenceClassification.from_pretrained(work / "rm").eval()
        seqs = [encode_reward_input(tok, p, r) for p, r in zip(prompts, responses)]

        @torch.no_grad()
        def call():
            out = []
            for s in range(0, len(seqs), batch):
                ids, _ = collate(seqs[s:s + batch], tok.pad_id)
                out += torch.sigmoid(model(input_ids=ids).logits[:, 0]).tolist()
            return out
    elif path == "ours-one-by-one":
        model = load_reward_model(work / "rm").eval()
        rows = model.users.rows(users)

        @torch.no_grad()
        def call():
            out = []
            for p, r, u in zip(prompts, responses, rows):
                ids, lengths = collate([encode_reward_input(tok, p, r)], tok.pad_id)
                out.append(torch.sigmoid(model(ids, lengths, torch.tensor([u]))).item())
            return out
    else:
        scorer = PRMUScorer(load_reward_model(work / "rm", use_user_table=path == "ours-table"), tok,
                            batch_size=batch)

        def call():
            return scorer.score(users, prompts, responses)
    return call, len(pairs), tokens


def child_peak_mb(path: str, work: str, n: int, batch: int) -> float:
    """Peak resident-set growth (MiB) over one call of `path`, after a warm-up call, in this fresh process."""
    return rss_growth_mb(make_call(path, work, n, batch)[0])


def time_paths(work: str, n: int, batch: int, repeats: int) -> dict:
    """Every path in this process, interleaved round by round (alternating the order), after one warm-up call
    each: per path the median seconds, all the scores, and the median over rounds of transformers' time / its
    time (so a busy neighbour slows a round's paths alike)."""
    calls = {path: make_call(path, work, n, batch) for path in PATHS}
    scores = {path: c[0]() for path, c in calls.items()}  # warm-up, and the scores compared
    secs = {path: [] for path in PATHS}
    for r in range(repeats):
        for path in (PATHS if r % 2 == 0 else PATHS[::-1]):
            t0 = time.perf_counter()
            calls[path][0]()
            secs[path].append(time.perf_counter() - t0)
    return {path: {"s": statistics.median(secs[path]), "scores": scores[path], "n": calls[path][1],
                   "tokens": calls[path][2],
                   "ratio": statistics.median(a / b for a, b in zip(secs["transformers"], secs[path]))}
            for path in PATHS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", default="")
    ap.add_argument("--work", default="")
    args = ap.parse_args()
    print(machine_line())
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.child:
        print(json.dumps(child_peak_mb(args.child, args.work, args.n, args.batch)))
        return

    from minitagpr.data import demo_world
    from minitagpr.data.preferences import synthesize_demo_pairs, write_pairs
    from minitagpr.model.presets import tiny_config
    from minitagpr.model.reward import PRMU, save_reward_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = demo_world.build(work / "world")
        pairs = synthesize_demo_pairs(world.root)["PQP"]
        write_pairs(work / "pairs.jsonl", pairs)
        n_rows = -(-world.stats["vocab_size"] // 64) * 64
        cfg = tiny_config("demo", vocab_size=n_rows)
        from minitagpr.tokenizer import Tokenizer
        cfg.pad_token_id = Tokenizer.from_dir(world.tokenizer_dir).pad_id
        model = PRMU(cfg, {p.user for p in pairs})
        model.init_weights(0)
        with torch.no_grad():
            model.user_table.weight.normal_(0, 0.02)  # distinct users, as after training
        files = {n: world.tokenizer_dir / n for n in ("tokenizer.json", "tokenizer_config.json")}
        save_reward_model(model, work / "rm", extra_files=files)

        timed = time_paths(str(work), args.n, args.batch, args.repeats)
        for path in PATHS:
            cmd = [sys.executable, __file__, "--child", path, "--work", str(work), "--n", str(args.n),
                   "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            timed[path]["peak_mb"] = json.loads(out.stdout.strip().splitlines()[-1])
    results = [timed[path] | {"path": path} for path in PATHS]
    print(f"PRMU scoring, demo preset ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
          f"{results[0]['n']} sequences ({results[0]['tokens']} tokens), batch {args.batch}, "
          f"{os.environ.get('BENCH_THREADS', '2')} threads, median of {args.repeats} interleaved rounds")
    print("| path | ms per call | sequences/s | tokens/s | vs transformers | peak RSS growth MB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['path']} | {r['s'] * 1e3:.0f} | {r['n'] / r['s']:.1f} | {r['tokens'] / r['s']:,.0f} | "
              f"{r['ratio']:.2f}x | {r['peak_mb']:.0f} |")

    def gap(a, b):
        return max(abs(x - y) for x, y in zip(timed[a]["scores"], timed[b]["scores"]))
    print(f"largest |diff| over all {results[0]['n']} scores: transformers vs ours-no-table "
          f"{gap('transformers', 'ours-no-table'):.2e}, ours-table vs ours-one-by-one "
          f"{gap('ours-table', 'ours-one-by-one'):.2e}")


if __name__ == "__main__":
    main()
