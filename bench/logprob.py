"""Benchmark token_logprobs: forward-only and forward+backward time and peak memory, each implementation against
the naive path (full logits -> log_softmax -> gather) measured in the same run.

    python bench/logprob.py                          # N in {1024, 4096, 8192} x H in {1024, 2048}, V = 151936
    python bench/logprob.py --n 8192 --h 1024        # one row (on a 2-core CPU: about 15 minutes)
    python bench/logprob.py --n 256 --h 256 --vocab 32768 --repeats 3   # a quick look

Each (N, H) runs in a fresh worker process that times the implementations interleaved, round by round (a busy
machine's drifting load then falls on all of them alike); times are medians of --repeats rounds after --warmup
rounds. Peak memory is per call, above what was allocated when the call began: on CUDA max_memory_allocated, on
CPU the peak resident set (VmHWM, reset before each call). Forward-only is the no-grad path (old / reference
log-probs); forward+backward builds the graph and backpropagates sum(logp) into hidden and weight.
Rates: 8 N H V / time counts the four matmuls a recompute backward runs (the hardware's rate for the chunked
paths); 6 N H V / time the three the result needs (naive runs exactly these): the useful rate, which the CUDA rows
also report against a bf16 matmul of the same (N, H) x (H, V) shape measured on the same card.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from timing import PeakMemory, median_seconds, machine_line

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- worker: one (N, H, impl) in its own process -------------------------------------------------------------------

def run_worker(args) -> list[dict]:
    """All implementations on one (N, H), interleaved round by round so that a drifting machine load falls on
    each of them alike. Returns one record per implementation."""
    from minitagpr.kernels import token_logprobs

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    n, h, v = args.worker
    hidden = torch.randn(n, h, generator=gen, device=device, dtype=dtype)  # (N, H)
    weight = torch.randn(v, h, generator=gen, device=device, dtype=dtype) * (4.0 / h**0.5)  # (V, H), logits ~ 4
    targets = torch.randint(0, v, (n,), generator=gen, device=device)  # (N,)
    impls = args.impl.split(",")
    memory = PeakMemory(device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    records = {impl: dict(n=n, h=h, v=v, impl=impl, device=device, dtype=args.dtype, threads=args.threads,
                          fwd_s=[], fwdbwd_s=[], fwd_cpu=[], fwdbwd_cpu=[], fwd_peak=0, fwdbwd_peak=0)
               for impl in impls}

    def forward(impl):
        with torch.no_grad():
            token_logprobs(hidden, weight, targets, with_entropy=args.entropy, impl=impl, chunk_size=args.chunk_size)

    def forward_backward(impl):
        h_leaf = hidden.detach().requires_grad_()  # fresh leaves: each call allocates its own gradients
        w_leaf = weight.detach().requires_grad_()
        logp, entropy = token_logprobs(h_leaf, w_leaf, targets, with_entropy=args.entropy, impl=impl,
                                       chunk_size=args.chunk_size)
        loss = logp.sum() + (entropy.sum() if entropy is not None else 0)
        loss.backward()

    for round_ in range(args.warmup + args.repeats):
        for phase, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
            for impl in impls:
                memory.start()
                # one timed call per round (wall, process CPU); print_table takes the medians over rounds
                seconds, cpu = median_seconds(lambda: fn(impl), 1, warmup=0, cpu=True, sync=sync)
                rec = records[impl]
                if round_ >= args.warmup:  # warm-up rounds hold one-time allocations (workspaces, first buffers)
                    rec[phase + "_peak"] = max(rec[phase + "_peak"], memory.peak())
                    rec[phase + "_s"].append(seconds)
                    rec[phase + "_cpu"].append(cpu)
                print(f"#   round {round_} {phase} {impl}: {seconds:.3f} s wall, {cpu:.3f} s CPU", file=sys.stderr,
                      flush=True)

    if device == "cuda" and "triton" in impls:
        a = hidden.to(torch.bfloat16)
        b = weight.to(torch.bfloat16).T
        mm = median_seconds(lambda: a @ b, max(3, args.repeats), warmup=2, sync=sync)
        records["triton"]["matmul_tflops"] = 2 * n * h * v / mm / 1e12
    return list(records.values())


# ---- driver -------------------------------------------------------------------------------------------------------

def spawn(args, n: int, h: int, impls: list[str]) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", str(n), str(h), str(args.vocab), "--impl", ",".join(impls),
           "--dtype", args.dtype, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    cmd += ["--entropy"] if args.entropy else []
    cmd += ["--cpu"] if args.cpu else []
    cmd += ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # progress lines go to stderr
    if result.returncode != 0:
        raise SystemExit(f"worker {n}x{h} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    """Medians with their ratio to naive at the same (N, H); CPU-time columns only for CPU runs."""
    mib = 2**20
    cpu_run = rows[0]["device"] == "cpu"
    head = "| N | H | impl | fwd s | ÷ naive |" + (" fwd CPU s | ÷ naive |" if cpu_run else "")
    head += " fwd+bwd s | ÷ naive |" + (" f+b CPU s | ÷ naive |" if cpu_run else "")
    head += " fwd peak MiB | ÷ naive | f+b peak MiB | ÷ naive | f+b TFLOP/s, 8NHV | useful TFLOP/s, 6NHV |"
    print("(÷ naive: this row's value over naive's at the same N and H; below 1 is faster or smaller)")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        base = next(r for r in rows if r["n"] == row["n"] and r["h"] == row["h"] and r["impl"] == "naive")
        cells = [str(row["n"]), str(row["h"]), row["impl"]]
        for phase in ("fwd", "fwdbwd"):
            for unit in ("s", "cpu") if cpu_run else ("s",):
                value, value0 = statistics.median(row[f"{phase}_{unit}"]), statistics.median(base[f"{phase}_{unit}"])
                cells += [f"{value:.4g}", f"{value / value0:.2f}"]  # 4 significant digits: GPU times are ms
        for phase in ("fwd", "fwdbwd"):
            cells += [f"{row[phase + '_peak'] / mib:.0f}", f"{row[phase + '_peak'] / base[phase + '_peak']:.3f}"]
        # 8 N H V: the four matmuls a recompute backward runs (forward, recompute, dL/dh, dL/dW): the hardware's
        # rate for the chunked paths. 6 N H V: the three the result needs (naive runs exactly these): the useful rate,
        # the one to compare between paths and with the matmul roofline
        t = statistics.median(row["fwdbwd_s"])
        rate, useful = 8 * row["n"] * row["h"] * row["v"] / t / 1e12, 6 * row["n"] * row["h"] * row["v"] / t / 1e12
        cells += [f"{rate:.3f}", f"{useful:.3f}"]
        line = "| " + " | ".join(cells) + " |"
        if "matmul_tflops" in row:
            line += (f" useful = {100 * useful / row['matmul_tflops']:.0f}% of the bf16 matmul rate "
                     f"({row['matmul_tflops']:.0f} TFLOP/s)")
        print(line, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 8192], help="token counts N")
    p.add_argument("--h", type=int, nargs="+", default=[1024, 2048], help="hidden sizes H")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (Qwen3: 151936)")
    p.add_argument("--impls", nargs="+", default=None,
                   help="implementations besides naive (default: torch, plus triton on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--entropy", action="store_true", help="also compute the entropy (and backpropagate it)")
    p.add_argument("--chunk-size", type=int, default=None, help="token rows per chunk (default: by V)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--cpu", action="store_true", help="benchmark on the CPU even when CUDA is present")
    p.add_argument("--worker", type=int, nargs=3, metavar=("N", "H", "V"), help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    print(machine_line())
    cuda = torch.cuda.is_available() and not args.cpu
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    impls = ["naive"] + (args.impls or (["torch", "triton"] if cuda else ["torch"]))
    device = torch.cuda.get_device_name() if cuda else f"CPU ({args.threads} threads)"
    print(f"# token_logprobs benchmark: {device}, {args.dtype}, V={args.vocab}, entropy={args.entropy}, "
          f"median of {args.repeats} after {args.warmup} warm-up, peak memory above the inputs", flush=True)
    rows = []
    for h in args.h:
        for n in args.n:
            batch = spawn(args, n, h, impls)
            rows += batch
            print_table(batch)
    if len(args.n) * len(args.h) > 1:
        print("\n# all sizes")
        print_table(rows)


if __name__ == "__main__":
    main()
