"""Rollout throughput: generated tokens/s of our built-in engine vs transformers `generate()` (and vLLM when installed
and a GPU is present) on the same checkpoint, prompts, batch and sampling settings, in one run.

Each engine runs in its own subprocess so its peak memory is its own: the peak resident-set growth over the timed runs
(Linux VmHWM, reset through /proc/self/clear_refs after warm-up) on CPU, torch.cuda.max_memory_allocated on GPU.
Every run generates exactly max_new_tokens per sequence (no stop ids for us, min_new_tokens for transformers), so the
token counts are equal; times are medians over the timed runs after one warm-up.

Workloads: "batch16" = 16 ragged prompts x 1 sample (the acceptance target: ours >= 2x transformers on the demo model);
"4x4" = 4 prompts x n=4 samples (we prefill each prompt once and share it; transformers expands before prefill).

    python bench/rollout.py                                    # CPU fp32, demo model
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

WORKLOADS = {"batch16": (16, 1), "4x4": (4, 4)}  # name -> (prompts, samples per prompt)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def make_prompts(n_prompts: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n_prompts,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    n_prompts, n = WORKLOADS[args.workload]
    vocab = json.load(open(os.path.join(args.ckpt, "config.json")))["vocab_size"]
    prompts = make_prompts(n_prompts, vocab, args.prompt_min, args.prompt_max)
    T = args.max_new_tokens

    if args.engine == "ours":
        from minitagpr.model import load_pretrained
        from minitagpr.rollout import BuiltinEngine

        engine = BuiltinEngine(load_pretrained(args.ckpt, dtype=dtype, device=args.device).eval(), vocab_size=vocab)

        def run(seed):
            groups = engine.generate(prompts, n=n, temperature=args.temperature, top_p=args.top_p,
                                     max_new_tokens=T, stop_token_ids=[], seed=seed)
            return sum(len(c.token_ids) for g in groups for c in g)
    elif args.engine == "transformers":
        import transformers

        model = transformers.Qwen3ForCausalLM.from_pretrained(args.ckpt, dtype=dtype, attn_implementation="sdpa")
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
    else:  # vllm
        from minitagpr.rollout import VLLMEngine

        engine = VLLMEngine(args.ckpt, None, sleep_level=0, dtype=args.dtype, gpu_memory_utilization=0.5,
                            max_model_len=args.prompt_max + T + 8, expected_names=set())

        def run(seed):
            groups = engine.generate(prompts, n=n, temperature=args.temperature, top_p=args.top_p,
                                     max_new_tokens=T, stop_token_ids=[], seed=seed)
            return sum(len(c.token_ids) for g in groups for c in g)

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    run(1000)  # warm-up: allocator, kernels, caches
    sync()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    base_kb = _rss_kb("VmRSS")
    times, tokens = [], 0
    for r in range(args.runs):
        sync()
        t0 = time.perf_counter()
        tokens = run(r)
        sync()
        times.append(time.perf_counter() - t0)
    expected = n_prompts * n * T
    if tokens != expected:
        raise SystemExit(f"{args.engine}: generated {tokens} tokens, expected {expected}")
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
            else (_rss_kb("VmHWM") - base_kb) / 1024)
    return {"seconds": statistics.median(times), "tokens": tokens, "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-min", type=int, default=48)
    ap.add_argument("--prompt-max", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=1.0)  # the paper's rollout settings: T = 1, top-p = 1
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--engines", default="auto", help="comma list of ours,transformers,vllm (auto: vllm if usable)")
    ap.add_argument("--workloads", default="batch16,4x4")
    # internal: run one engine in this process and print its JSON
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return

    import importlib.util

    engines = args.engines.split(",")
    if args.engines == "auto":
        engines = ["transformers", "ours"]
        if args.device == "cuda" and importlib.util.find_spec("vllm") is not None:
            engines.append("vllm")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    from minitagpr.model import presets

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(presets.make_tiny_checkpoint(os.path.join(tmp, args.preset), preset=args.preset, seed=0))
        print(f"rollout throughput: preset {args.preset}, {args.device} {args.dtype}, {args.threads} threads, prompts "
              f"{args.prompt_min}-{args.prompt_max} tokens, {args.max_new_tokens} new tokens, T={args.temperature}, "
              f"top-p={args.top_p}, median of {args.runs}")
        print("| workload | engine | seconds | generated tok/s | vs transformers | peak MiB |")
        print("|---|---|---|---|---|---|")
        for workload in args.workloads.split(","):
            results = {}
            for engine in engines:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--engine", engine, "--workload",
                       workload, "--ckpt", ckpt]
                for key in ("device", "dtype", "threads", "runs", "max_new_tokens", "prompt_min", "prompt_max",
                            "temperature", "top_p"):
                    cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=repo,
                                      env={**os.environ, "PYTHONPATH": repo})
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"| {workload} | {engine} | failed: {done.stderr.strip().splitlines()[-1:]} | | | |")
                    continue
                results[engine] = json.loads(line[len("RESULT "):])
            base = results.get("transformers")
            for engine, r in results.items():
                rate = r["tokens"] / r["seconds"]
                ratio = f"{rate / (base['tokens'] / base['seconds']):.2f}x" if base else "n/a"
                print(f"| {workload} | {engine} | {r['seconds']:.3f} | {rate:,.0f} | {ratio} | {r['peak_mib']:.1f} |")


if __name__ == "__main__":
    main()
