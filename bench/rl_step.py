"""RL train-phase cost: the old log-probs (no-grad forward) plus the GSPO update over the mini-batches of one
rollout batch (minitagpr.rl.loop: sequence_logprobs + gspo_update), one process, on demo-shaped rows.

    python bench/rl_step.py [--preset demo] [--prompts 8] [--rounds 3]

Rows: `--prompts` prompts x G responses (one rank's share of the demo's 16-prompt step on 2 ranks), prompt lengths
uniform in [--prompt-min, --prompt-max], response lengths in [--resp-min, --resp-max], right padded to the longest
row as make_sequences does. Two ways to cut them into micro-batches, timed in interleaved rounds:
  full width  rows in order, every micro-batch run at the whole batch's width (what the loop did before)
  cut         rows ordered by where their response ends, each micro-batch cut at its last target (the loop now)
Both give the same log-probs and the same update (tests/test_rl_loop.py). Reported: median wall seconds per train
phase, real (non-padding) tokens per second, ratio to full width, peak RSS above the start of the phase.
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext

import torch

import minitagpr.rl.loop as L
from minitagpr import distributed as D
from minitagpr.model.presets import make_tiny_checkpoint
from minitagpr.train.optim import build_optimizer
from timing import PeakMemory, machine_line


def make_batch(args, vocab: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    lengths = []  # (prompt tokens, response tokens) per row, prompt-major
    for _ in range(args.prompts):
        p = rng.randint(args.prompt_min, args.prompt_max)
        lengths += [(p, rng.randint(args.resp_min, args.resp_max)) for _ in range(args.group)]
    N, T = len(lengths), max(p + r for p, r in lengths) - 1
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (N, T), generator=g)  # (N, T)
    targets = torch.full((N, T), -100, dtype=torch.long)  # (N, T): response targets only
    for n, (p, r) in enumerate(lengths):
        targets[n, p - 1:p + r - 1] = torch.randint(0, vocab, (r,), generator=g)
    return {"input_ids": input_ids, "targets": targets, "mask": targets != -100,
            "advantages": torch.randn(N, generator=g), "real_tokens": sum(p + r - 1 for p, r in lengths)}


@contextmanager
def full_width():
    """The loop as it was: micro-batches in row order, each at the batch's full width."""
    used, chunks = L.used_columns, L.micro_batches
    L.used_columns = lambda mask: mask.shape[1]
    L.micro_batches = lambda rows, size, mask=None: chunks(rows, size)
    try:
        yield
    finally:
        L.used_columns, L.micro_batches = used, chunks


def train_phase(model, optimizer, batch: dict, cfg, device) -> None:
    rows = [r for chunks in L.micro_batch_plan(batch["mask"], len(batch["advantages"]) // cfg.group_size, cfg)
            for r in chunks]
    old = L.sequence_logprobs(model, batch["input_ids"].to(device), batch["targets"].to(device), rows)  # (N, T)
    L.gspo_update(model, optimizer, {k: batch[k] for k in ("input_ids", "targets", "mask", "advantages")}
                  | {"old_logp": old}, cfg, device)
    D.wait_for_device(device)  # on a GPU the phase's queued work belongs to this phase's time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=5)
    ap.add_argument("--prompt-min", type=int, default=250)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--resp-min", type=int, default=40)
    ap.add_argument("--resp-max", type=int, default=160)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)  # 1: a shared 2-core box makes 2 threads spin-wait
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = D.init_distributed()  # a process group of one
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(f"{tmp}/m", preset=args.preset, seed=0)
        model = D.build_sharded_causal_lm(ckpt, info, D.device_mesh(info))
        vocab = model.config.vocab_size
    optimizer = build_optimizer(model, 1e-4)
    cfg = L.RLConfig(group_size=args.group, num_minibatches=args.minibatches, micro_batch_size=args.micro_batch,
                     prompts_per_step=args.prompts * args.minibatches)
    batch = make_batch(args, vocab)
    N, T = batch["input_ids"].shape
    ways = {"full width": full_width, "cut": nullcontext}
    times = {w: [] for w in ways}
    peaks = {w: 0 for w in ways}
    memory = PeakMemory(info.device.type)
    for w, ctx in ways.items():  # warm-up
        with ctx():
            train_phase(model, optimizer, batch, cfg, info.device)
    for _ in range(args.rounds):  # interleaved, so a busy neighbour slows both alike
        for w, ctx in ways.items():
            with ctx():
                memory.start()
                t0 = time.perf_counter()
                train_phase(model, optimizer, batch, cfg, info.device)
                times[w].append(time.perf_counter() - t0)
                peaks[w] = max(peaks[w], memory.peak())
    print(f"RL train phase: preset {args.preset}, {N} rows ({args.prompts} prompts x G={args.group}), width {T}, "
          f"{batch['real_tokens']} real tokens ({batch['real_tokens'] / (N * T):.0%} of the padded batch), "
          f"micro-batch {args.micro_batch}, {args.minibatches} mini-batches, {args.threads} thread(s); median of "
          f"{args.rounds} interleaved rounds")
    print("| micro-batches | seconds | real tok/s | vs full width | peak MiB |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["full width"])
    for w in ways:
        sec = statistics.median(times[w])
        print(f"| {w} | {sec:.3f} | {batch['real_tokens'] / sec:,.0f} | {base / sec:.2f}x | {peaks[w] / 2**20:.1f} |")
    D.destroy_distributed()


if __name__ == "__main__":
    main()
