"""Chain-pipeline cache benchmark: what resuming a long, paid run costs, each number beside a baseline.

    python bench/chains_cache.py [--lines 20000] [--chars 2000] [--puts 300] [--repeats 3]

- reopen: `ResponseCache` indexing a cache file of `--lines` answers (key -> offset; answers stay on disk) vs the
  obvious baseline, `json.loads` of every line into a dict held in memory. Peak Python memory of both.
- resume: `ChatClient.run` over `--lines` requests that are all cached (request hashing, cache reads, ordering,
  no call) vs the baseline of looking the same answers up in the in-memory dict.
- put: a durable append (one write + flush + fsync per answer, what makes a kill lose nothing) vs the same append
  without fsync. A hosted teacher answer takes seconds; the per-answer fsync cost is what to compare it with.
Medians of `--repeats` after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minitagpr.data.chain_client import (  # noqa: E402
    ChatClient, ChatRequest, EndpointConfig, Endpoint, ResponseCache, request_key,
)
from timing import median_seconds, python_peak_mb, machine_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--chars", type=int, default=2_000, help="characters of reasoning per cached answer")
    ap.add_argument("--puts", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(machine_line())

    cfg = EndpointConfig(concurrency=8)
    endpoint = Endpoint("teacher", "http://unused/v1", "teacher-model", "EMPTY")
    requests = [ChatRequest(f"LaMP-3/{i // 4}", [{"role": "user", "content": f"question {i // 4}"}], sample=i % 4,
                            seed=i) for i in range(args.lines)]
    params = lambda r: {**cfg.sampling_params(), "seed": r.seed}  # noqa: E731 -- what ChatClient sends
    keys = [request_key(endpoint.model, r.messages, params(r), r.sample) for r in requests]
    filler = ("The user rated similar kettles 4. " * (args.chars // 34 + 1))[: args.chars]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "teacher.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i, key in enumerate(keys):
                response = {"content": "4", "reasoning": f"{i}: {filler}", "finish_reason": "stop", "usage": None}
                f.write(json.dumps({"key": key, "stage": "teacher", "model": endpoint.model,
                                    "response": response}) + "\n")
        size_mb = path.stat().st_size / 2**20

        def reopen():
            ResponseCache(path).close()

        def load_all():
            with open(path, encoding="utf-8") as f:
                return {r["key"]: r["response"] for r in map(json.loads, f)}

        t_reopen, t_load = median_seconds(reopen, args.repeats), median_seconds(load_all, args.repeats)
        mem_reopen = python_peak_mb(lambda: ResponseCache(path))
        mem_load = python_peak_mb(load_all)

        def resume():
            with ResponseCache(path) as cache:
                client = ChatClient(endpoint, cfg, cache, "teacher", transport=lambda kw: 1 / 0, log=lambda m: None)
                for _ in client.run(requests):
                    pass

        def lookup():  # the same work as resume: from the file on disk to every request's answer
            table = load_all()
            for r in requests:
                table[request_key(endpoint.model, r.messages, params(r), r.sample)]

        t_resume, t_lookup = median_seconds(resume, args.repeats), median_seconds(lookup, args.repeats)

        line = {"content": "4", "reasoning": filler, "finish_reason": "stop", "usage": None}

        def durable_puts():
            with ResponseCache(Path(tmp) / f"put-{time.perf_counter_ns()}.jsonl") as cache:
                for i in range(args.puts):
                    cache.put(f"k{i}", "teacher", "m", line)

        def plain_appends():
            with open(Path(tmp) / f"plain-{time.perf_counter_ns()}.jsonl", "a", encoding="utf-8") as f:
                for i in range(args.puts):
                    f.write(json.dumps({"key": f"k{i}", "response": line}) + "\n")
                    f.flush()

        t_put, t_plain = median_seconds(durable_puts, args.repeats), median_seconds(plain_appends, args.repeats)

    n = args.lines
    print(f"{n} cached answers of ~{args.chars} chars ({size_mb:.0f} MB cache file), median of {args.repeats}")
    print("| operation | ms | per item (us) | vs baseline | peak Python MB |")
    print("|---|---|---|---|---|")
    print(f"| baseline: json.loads every line into a dict | {1e3 * t_load:.0f} | {1e6 * t_load / n:.1f} | 1.00x | "
          f"{mem_load:.0f} |")
    print(f"| ResponseCache reopen (index only) | {1e3 * t_reopen:.0f} | {1e6 * t_reopen / n:.1f} | "
          f"{t_load / t_reopen:.2f}x | {mem_reopen:.0f} |")
    print(f"| baseline: load every line into a dict, then hash + look up | {1e3 * t_lookup:.0f} | "
          f"{1e6 * t_lookup / n:.1f} | 1.00x | - |")
    print(f"| ChatClient.run, all cached (reopen + run) | {1e3 * t_resume:.0f} | {1e6 * t_resume / n:.1f} | "
          f"{t_lookup / t_resume:.2f}x | - |")
    p = args.puts
    print(f"| baseline: append + flush, no fsync ({p}) | {1e3 * t_plain:.0f} | {1e6 * t_plain / p:.1f} | 1.00x | - |")
    print(f"| ResponseCache.put, fsync ({p}) | {1e3 * t_put:.0f} | {1e6 * t_put / p:.1f} | "
          f"{t_plain / t_put:.2f}x | - |")


if __name__ == "__main__":
    main()
