"""Training-step throughput of our Qwen3 vs transformers' Qwen3ForCausalLM: same config, weights, batch, in one run.

Each (implementation, shape) runs in its own subprocess so peak memory is its own: the peak resident-set growth over
the step (Linux VmHWM, reset through /proc/self/clear_refs after warm-up) on CPU, torch.cuda.max_memory_allocated on
GPU. Times are medians of timed steps after warm-up. A step = forward + next-token loss + backward.
On CUDA the table adds MFU: tokens/s x `flops_per_token` (6 per matmul weight + causal attention) over two peaks,
the card's datasheet dense bf16 rate and a bf16 8192^3 matmul measured on the same card in the same run.

    python bench/model_throughput.py                    # CPU fp32: demo shape and a 2-layer slice of Qwen3-0.6B
    python bench/model_throughput.py --device cuda --dtype bfloat16   # adds the whole Qwen3-0.6B
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from timing import PeakMemory, child_output, median_seconds, machine_line

SHAPES = {  # name -> (preset, batch, seq_len)
    "demo": ("demo", 8, 256),
    "qwen3-0.6b-2layer": ("qwen3-0.6b-2layer", 2, 512),
    "qwen3-0.6b": ("qwen3-0.6b", 4, 2048),  # the whole model: for GPUs (--shapes qwen3-0.6b)
}
IMPLS = ["ours-fused", "ours-recompute", "ours-logits", "transformers"]


def child(impl: str, ckpt: str, batch: int, seq: int, device: str, dtype: str, steps: int, warmup: int) -> dict:
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    if impl.startswith("ours"):
        from minitagpr.model import load_pretrained
        model = load_pretrained(ckpt, dtype=dt, device=device)
    else:
        import transformers
        model = transformers.Qwen3ForCausalLM.from_pretrained(ckpt, dtype=dt, attn_implementation="sdpa").to(device)
    model.train()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, seq), device=device)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    weights = (targets != -100).float() / -(targets != -100).sum()  # mean NLL as sum_t w_t logp_t

    def step():
        if impl == "ours-fused":  # SFT's path: loss linear in logp (CPU: head gradient in the forward; CUDA: Triton)
            loss, _ = model(ids, targets=targets, token_weights=weights)
        elif impl == "ours-recompute":  # RL's path: per-token log-probs (fused, logits recomputed in the backward)
            logp, _ = model(ids, targets=targets)
            loss = -logp.sum() / (targets != -100).sum()
        elif impl == "ours-logits":  # the plain twin: full logits then cross-entropy
            logits = model.logits(model(ids))
            loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)
        else:
            loss = model(input_ids=ids, labels=ids).loss  # shifts labels internally: same tokens as `targets`
        loss.backward()
        model.zero_grad(set_to_none=True)

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # synchronize and the memory stats act on the current device

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    memory = PeakMemory(device)
    memory.start()  # after the warm-up: the peak is the steps' own, above what the warm-up left allocated
    med = median_seconds(step, steps, warmup=0, sync=sync)
    return {"impl": impl, "step_s": med, "tokens_per_s": batch * seq / med, "peak_bytes": memory.peak()}


def matmul_tflops(device: str, size: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul rate on this card (random operands: zeros run faster), the achievable roofline."""
    import torch
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, repeats, warmup=3, sync=torch.cuda.synchronize)
    return 2 * size**3 / seconds / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="", help=f"comma list of {', '.join(SHAPES)} (default: the CPU shapes, "
                    "demo and the 2-layer slice, on a CPU; all three on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every implementation")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list (transformers is the ratio's baseline)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    print(machine_line())
    if not args.shapes:
        args.shapes = ",".join(SHAPES) if args.device.startswith("cuda") else "demo,qwen3-0.6b-2layer"
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; expected some of {', '.join(SHAPES)}")
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return
    from minitagpr.model.presets import make_tiny_checkpoint, tiny_config
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            preset, batch, seq = SHAPES[shape]
            ckpt = make_tiny_checkpoint(f"{tmp}/{shape}", preset=preset, seed=0)
            impls = [i for i in IMPLS if i in args.impls.split(",") or i == "transformers"]
            runs: dict[str, list[dict]] = {impl: [] for impl in impls}
            for _ in range(args.rounds):  # interleaved rounds: a busy machine slows every implementation alike
                for impl in impls:
                    spec = dict(impl=impl, ckpt=str(ckpt), batch=batch, seq=seq, device=args.device,
                                dtype=args.dtype, steps=args.steps, warmup=args.warmup)
                    runs[impl].append(json.loads(child_output([__file__, "--child", json.dumps(spec)], env)))
            results = {impl: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                              "peak_bytes": statistics.median(r["peak_bytes"] for r in rs)}
                       for impl, rs in runs.items()}
            ref = results["transformers"]
            model_flops = flops_per_token(tiny_config(preset), seq)
            for impl in impls:
                r = results[impl]
                rows.append((shape, f"{batch}x{seq}", impl, r["tokens_per_s"], r["tokens_per_s"] / ref["tokens_per_s"],
                             r["peak_bytes"] / 2**20, r["peak_bytes"] / max(ref["peak_bytes"], 1),
                             r["tokens_per_s"] * model_flops))
    print(f"device={args.device} dtype={args.dtype} threads={args.threads} steps={args.steps} (median) "
          f"warmup={args.warmup} rounds={args.rounds} (interleaved, median of rounds)")
    cuda = args.device.startswith("cuda") and args.dtype == "bfloat16"  # the peaks below are bf16 rates
    if args.device.startswith("cuda") and not cuda:
        print(f"no MFU columns: the datasheet and matmul peaks are bf16 rates, this run is {args.dtype} "
              f"(use --dtype bfloat16)")
    if cuda:
        import torch
        from minitagpr.train.metrics import peak_flops
        torch.cuda.set_device(torch.device(args.device))  # the matmul timer synchronizes the current device
        sheet, where = peak_flops(torch.device(args.device))
        measured = matmul_tflops(args.device)
        print(f"MFU peaks: datasheet {where}; measured bf16 8192^3 matmul {measured:.0f} TFLOP/s")
    head = "| shape | batch | impl | tokens/s | vs transformers | peak MiB | peak vs transformers |"
    head += " model TFLOP/s | MFU (datasheet) | MFU (measured matmul) |" if cuda else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for shape, bt, impl, tps, ratio, mib, mratio, flops in rows:
        line = f"| {shape} | {bt} | {impl} | {tps:,.0f} | {ratio:.2f}x | {mib:,.0f} | {mratio:.2f}x |"
        if cuda:
            line += f" {flops / 1e12:.1f} | {100 * flops / sheet:.1f}% | {100 * flops / 1e12 / measured:.1f}% |"
        print(line)


def flops_per_token(cfg, seq: int) -> float:
    """Our model's FLOPs count for `cfg`, from a meta-device model (no memory, no init)."""
    import torch
    from minitagpr.model.qwen3 import Qwen3ForCausalLM
    with torch.device("meta"):
        return Qwen3ForCausalLM(cfg).flops_per_token(seq)


if __name__ == "__main__":
    main()
