"""Rollout throughput: generated tokens/s of our built-in engine vs transformers `generate()` (and vLLM when installed
and a GPU is present) on the same checkpoint, prompts, batch and sampling settings, in one run.

Timing runs all engines in one process, interleaved: each round runs every engine once (alternating the order), so
a busy neighbour on a shared machine slows the engines of a round alike; the ratio is the median over rounds of the
per-round speed ratio to transformers, the seconds the median per engine, after one warm-up run each. Peak memory
comes from a separate process per engine: the peak resident-set growth over one run (Linux VmHWM, reset through
/proc/self/clear_refs after warm-up) on CPU; on GPU torch.cuda.max_memory_allocated, absolute: weights and KV cache
included (the table's header says which). Every run generates exactly
max_new_tokens per sequence (no stop ids for us, min_new_tokens for transformers), so token counts are equal.

Our engine's rows: "ours" = the dynamic decode loop (the engine's choice on CPUs); "ours-static" = fixed shapes,
run eagerly; "ours-graph" = the fixed-shape step as a CUDA graph (GPU only, and the engine's choice there;
rollout/static_decode.py).

Workloads (16 or 40 sequences): "batch16" = 16 distinct ragged prompts x 1 sample; "group16" = 4 prompts x 4 samples
and "rl-demo" = 8 prompts x 5 samples, the shape of an RL rollout (we prefill each prompt once and share its cache
across the samples; transformers expands the prompts before its prefill). Defaults mirror the demo's RL rollouts:
prompts of 400-640 tokens (the v1 demo world's shape, kept so the dated tables compare; today's demo prompts are
192-371 tokens), 160 new tokens, T = 1, top-p = 1.

    python bench/rollout.py                                    # CPU fp32, demo model, 1 thread
    python bench/rollout.py --device cuda --dtype bfloat16 --preset qwen3-0.6b-2layer --max-new-tokens 256
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

from timing import reset_rss_peak, status_kib, machine_line

# our engine's rows -> its decode mode (BuiltinEngine(decode=...)); "ours-graph" needs CUDA
OURS = {"ours": "dynamic", "ours-static": "static", "ours-graph": "graph"}
# name -> (prompts, samples per prompt); "rl-demo" is one rank's rollout in the demo's guided RL (8 prompts, G = 5)
WORKLOADS = {"batch16": (16, 1), "group16": (4, 4), "rl-demo": (8, 5)}


def make_prompts(n_prompts: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n_prompts,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def make_runner(engine: str, args, ckpt: str, prompts: list[list[int]], n: int):
    """A function seed -> number of generated tokens, for one engine on this process's device."""
    import torch

    dtype = getattr(torch, args.dtype)
    T = args.max_new_tokens
    if engine in OURS:
        from minitagpr.model import load_pretrained
        from minitagpr.rollout import BuiltinEngine

        model = load_pretrained(ckpt, dtype=dtype, device=args.device).eval()
        ours = BuiltinEngine(model, vocab_size=model.config.vocab_size, decode=OURS[engine])

        def run(seed):
            groups = ours.generate(prompts, n=n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=T,
                                   stop_token_ids=[], seed=seed)
            return sum(len(c.token_ids) for g in groups for c in g)
        return run
    if engine == "transformers":
        import transformers

        model = transformers.Qwen3ForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa")
        model = model.to(args.device).eval()
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, L) left padded, as generate() expects
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        ids, mask = ids.to(args.device), mask.to(args.device)

        def run(seed):
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=args.temperature > 0,
                                     temperature=args.temperature if args.temperature > 0 else None,
                                     top_p=args.top_p, top_k=0, num_return_sequences=n, max_new_tokens=T,
                                     min_new_tokens=T, pad_token_id=0, eos_token_id=None)
            return (out.shape[1] - width) * out.shape[0]
        return run
    from minitagpr.rollout import VLLMEngine

    vllm = VLLMEngine(ckpt, None, sleep_level=0, dtype=args.dtype, gpu_memory_utilization=0.5,
                      max_model_len=args.prompt_max + T + 8, expected_names=set())

    def run(seed):
        groups = vllm.generate(prompts, n=n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=T,
                               stop_token_ids=[], seed=seed)
        return sum(len(c.token_ids) for g in groups for c in g)
    return run


def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    n_prompts, n = WORKLOADS[args.workload]
    vocab = json.load(open(os.path.join(args.ckpt, "config.json")))["vocab_size"]
    return make_prompts(n_prompts, vocab, args.prompt_min, args.prompt_max), n_prompts, n


def child_memory(args) -> dict:
    """Peak memory of one engine over one run after a warm-up, measured in a process of its own."""
    import torch

    prompts, _, n = _setup(args)
    run = make_runner(args.engine, args, args.ckpt, prompts, n)
    run(1000)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        base_kb = reset_rss_peak()
    run(0)
    if args.device == "cuda":
        torch.cuda.synchronize()
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_mib": (status_kib("VmHWM") - base_kb) / 1024}


def time_engines(args, engines: list[str]) -> dict:
    """Interleaved timing in this process: every round runs each engine once (order alternating), so a busy
    neighbour slows all engines of a round alike; returns per engine the median seconds and the median of the
    per-round speed ratios against transformers."""
    import torch

    prompts, n_prompts, n = _setup(args)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    runners = {}
    for e in engines:  # build + warm up (allocator, kernels, caches); an engine that fails is reported and left out
        try:
            runners[e] = make_runner(e, args, args.ckpt, prompts, n)
            runners[e](1000)
            sync()
        except Exception as exc:  # noqa: BLE001 -- one broken engine must not cost a GPU lease the whole table
            runners.pop(e, None)
            print(f"{e}: failed, left out of the table: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    engines = list(runners)
    times = {e: [] for e in engines}
    expected = n_prompts * n * args.max_new_tokens
    for r in range(args.runs):
        for e in (engines if r % 2 == 0 else engines[::-1]):
            sync()
            t0 = time.perf_counter()
            tokens = runners[e](r)
            sync()
            times[e].append(time.perf_counter() - t0)
            if tokens != expected:
                raise SystemExit(f"{e}: generated {tokens} tokens, expected {expected}")
    out = {}
    for e in engines:
        ratios = [b / t for t, b in zip(times[e], times.get("transformers", times[e]))]
        out[e] = {"seconds": statistics.median(times[e]), "tokens": expected, "ratio": statistics.median(ratios)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)  # 1: a shared 2-core box makes 2 threads spin-wait
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--prompt-min", type=int, default=400)
    ap.add_argument("--prompt-max", type=int, default=640)
    ap.add_argument("--temperature", type=float, default=1.0)  # the paper's rollout settings: T = 1, top-p = 1
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--engines", default="auto", help="comma list of transformers,ours,ours-static,ours-graph,vllm "
                    "(auto: transformers,ours, + ours-graph on CUDA, + vllm if usable)")
    ap.add_argument("--workloads", default="batch16,group16,rl-demo")
    # internal: run one engine in this process and print its JSON
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    print(machine_line())
    if args.child:
        print("RESULT " + json.dumps(child_memory(args)))
        return

    import importlib.util

    engines = args.engines.split(",")
    if args.engines == "auto":
        engines = ["transformers", "ours"]
        if args.device == "cuda":
            engines.append("ours-graph")
        if args.device == "cuda" and importlib.util.find_spec("vllm") is not None:
            engines.append("vllm")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    from minitagpr.model import presets

    with tempfile.TemporaryDirectory() as tmp:
        args.ckpt = str(presets.make_tiny_checkpoint(os.path.join(tmp, args.preset), preset=args.preset, seed=0))
        print(f"rollout throughput: preset {args.preset}, {args.device} {args.dtype}, {args.threads} threads, prompts "
              f"{args.prompt_min}-{args.prompt_max} tokens, {args.max_new_tokens} new tokens, T={args.temperature}, "
              f"top-p={args.top_p}; median of {args.runs} interleaved rounds")
        peak_head = "peak MiB allocated (all)" if args.device == "cuda" else "peak RSS growth MiB"
        print(f"| workload | engine | seconds | generated tok/s | vs transformers | {peak_head} |")
        print("|---|---|---|---|---|---|")
        for workload in args.workloads.split(","):
            args.workload = workload
            timed = time_engines(args, engines)
            # the timings first, before the peak-memory children (each loads the checkpoint again): a capped run
            # that ends among the children still reports every speed (a GPU lease lost two rows that way)
            print(f"# {workload} timed: " + "; ".join(
                f"{e} {r['seconds']:.3f} s, {r['tokens'] / r['seconds']:,.0f} tok/s"
                + (f", {r['ratio']:.2f}x" if "transformers" in timed else "") for e, r in timed.items()),
                  file=sys.stderr, flush=True)
            for engine, r in timed.items():
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--engine", engine, "--workload",
                       workload, "--ckpt", args.ckpt]
                for key in ("preset", "device", "dtype", "threads", "max_new_tokens", "prompt_min", "prompt_max",
                            "temperature", "top_p"):
                    cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=repo,
                                      env={**os.environ, "PYTHONPATH": repo})
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                peak = f"{json.loads(line[7:])['peak_mib']:.1f}" if line else "failed"
                if engine == "vllm" and line:  # it reserves gpu_memory_utilization of the card up front
                    peak += " (pool reserved, not the workload's)"
                ratio = f"{r['ratio']:.2f}x" if "transformers" in timed else "n/a"
                print(f"| {workload} | {engine} | {r['seconds']:.3f} | {r['tokens'] / r['seconds']:,.0f} | {ratio} "
                      f"| {peak} |", flush=True)


if __name__ == "__main__":
    main()
