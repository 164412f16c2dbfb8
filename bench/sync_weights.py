"""Weight sync cost: the per-RL-step copy of the FSDP2 policy's weights into the rollout engine's own unsharded
model (minitagpr.rl.loop.sync_to_engine -> BuiltinEngine.sync_weights), against a naive baseline and a floor.

    torchrun --nproc_per_node=2 bench/sync_weights.py --preset demo --rounds 7
    torchrun --nproc_per_node=1 bench/sync_weights.py --preset qwen3-0.6b-2layer --rounds 5

Setup as in guided RL (minitagpr.rl.loop.train / build_engine): a seeded random checkpoint of `--preset` (demo or
qwen3-0.6b-2layer), the policy built from it by D.build_sharded_causal_lm (fp32 master weights sharded over all
ranks), and on every rank a BuiltinEngine around its own fp32 copy from load_pretrained. CPU with gloo, or one GPU
per rank with nccl (picked by D.init_distributed), unchanged. Rows:
  ours   sync_to_engine(policy, engine): per parameter, full_tensor() (an all-gather of its FSDP2 shards) streamed
         into engine.sync_weights, which copies it into the engine's parameter
  naive  every rank gathers the whole full state dict (get_model_state_dict, full_state_dict=True), then
         engine.model.load_state_dict(it): what one writes without thinking about memory
  floor  the same bytes moved once, into preallocated buffers: one all-gather of a flat fp32 buffer of the model's
         size (each rank contributes 1/world of it) plus one copy_ into another preallocated buffer; with 1
         process just the copy_. The transport + memcpy roofline of this machine
Before timing, the engine's weights are set to NaN, ours syncs once, and every engine parameter must then equal the
policy's full tensor (RuntimeError otherwise). Timing: one warm-up call per path, then `--rounds` rounds running
every path once (order alternating; a barrier before each call so ranks start together); a call's time is the
slowest rank's. Columns: median ms per sync; MB moved = the model's fp32 bytes (a tied head counted once); GB/s =
those bytes / the median time; "vs naive" and "vs floor" = medians over rounds of the per-round speed ratio (naive's
or the floor's time / this path's time: above 1x faster, below 1x slower); peak growth = the largest over rounds
and ranks of the memory a call adds above what it started with (resident set on CPU; max_memory_allocated on GPU).
Only rank 0 prints.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from minitagpr import distributed as D
from minitagpr.model import load_pretrained
from minitagpr.model.presets import make_tiny_checkpoint
from minitagpr.rl.loop import sync_to_engine
from minitagpr.rollout.base import hf_name
from minitagpr.rollout.builtin import BuiltinEngine
from timing import PeakMemory, median_seconds, machine_line

PRESETS = ("demo", "qwen3-0.6b-2layer")
# one all-gather into one flat output tensor (all_gather_into_tensor is deprecated under this name since torch 2.13)
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def build(preset: str, info: D.DistInfo):
    """(FSDP2 policy, engine with its own full copy), both from one seeded random checkpoint written by rank 0."""
    folder = tempfile.mkdtemp(prefix="sync_weights_") if info.is_main else None
    folder = D.broadcast_object(folder)
    try:
        if info.is_main:
            make_tiny_checkpoint(f"{folder}/m", preset=preset, seed=0)
        D.barrier()
        policy = D.build_sharded_causal_lm(f"{folder}/m", info, D.device_mesh(info))
        engine = BuiltinEngine(load_pretrained(f"{folder}/m", dtype=torch.float32, device=info.device).eval())
    finally:
        D.barrier()
        if info.is_main:
            shutil.rmtree(folder, ignore_errors=True)
    return policy, engine


def naive_sync(policy, engine) -> None:
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))  # on every rank
    engine.model.load_state_dict(full)


class Floor:
    """One all-gather of a flat buffer of `numel` fp32 elements plus one copy_, all into preallocated buffers."""

    def __init__(self, numel: int, info: D.DistInfo):
        self.world = info.world_size
        per_rank = -(-numel // self.world)
        self.shard = torch.randn(per_rank, device=info.device)  # this rank's part
        self.gathered = torch.randn(per_rank * self.world, device=info.device)  # with 1 process: the source
        self.dest = torch.empty_like(self.gathered)
        self.bytes = self.dest.numel() * self.dest.element_size()

    def __call__(self) -> None:
        if self.world > 1:
            ALL_GATHER(self.gathered, self.shard)
        self.dest.copy_(self.gathered)


@torch.no_grad()
def check_ours(policy, engine, device) -> int:
    """NaN the engine's weights, sync once, require every engine parameter to equal the policy's full tensor."""
    params = dict(engine.model.named_parameters())
    for p in params.values():
        p.fill_(float("nan"))
    sync_to_engine(policy, engine)
    bad = [n for n in params if torch.isnan(params[n]).any()]  # never written
    for name, p in policy.named_parameters():  # collective: every rank gathers every parameter, in the same order
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        if not torch.equal(params[hf_name(name)], full.to(device)):
            bad.append(name)
    flag = torch.tensor([float(len(bad))], device=device)
    D.all_reduce_sum(flag)
    if flag.item():
        raise RuntimeError(f"sync_to_engine left {int(flag.item())} engine parameter(s) unequal to the policy's "
                           f"full tensors (this rank: {sorted(set(bad))[:5]})")
    return len(params)


def machine(info: D.DistInfo) -> str:
    if info.device.type == "cuda":
        return torch.cuda.get_device_name(info.device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo", choices=PRESETS)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)  # 1: a shared 2-core box makes 2 threads spin-wait
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = D.init_distributed()
    D.log(machine_line())  # after joining the group: it counts the processes
    load_before = load_average()
    policy, engine = build(args.preset, info)
    model_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())  # a tied head once
    n_params = sum(p.numel() for p in engine.model.parameters())
    n_tensors = check_ours(policy, engine, info.device)
    D.log(f"correctness: after sync_to_engine all {n_tensors} engine parameters equal the policy's full tensors")

    floor = Floor(n_params, info)
    paths = {"ours": lambda: sync_to_engine(policy, engine), "naive": lambda: naive_sync(policy, engine),
             "floor": floor}
    sync = torch.cuda.synchronize if info.device.type == "cuda" else None
    memory = PeakMemory(info.device.type)
    for fn in paths.values():  # warm-up: allocator, communicator buffers, first-call paths
        fn()
    secs = {p: [] for p in paths}
    peaks = {p: 0 for p in paths}
    names = list(paths)
    for r in range(args.rounds):  # interleaved, so a busy neighbour slows a round's paths alike
        for p in (names if r % 2 == 0 else names[::-1]):
            memory.start()  # before the barrier: a rank's heap trim must not be waited for inside the timed sync
            D.barrier()
            secs[p].append(median_seconds(paths[p], 1, warmup=0, sync=sync))  # one timed call
            peaks[p] = max(peaks[p], memory.peak())
    # a sync ends when its slowest rank does; memory: the worst rank
    times = torch.tensor([secs[p] for p in names], dtype=torch.float64, device=info.device)  # (paths, rounds)
    mem = torch.tensor([float(peaks[p]) for p in names], dtype=torch.float64, device=info.device)
    if info.world_size > 1:
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    times, mem = times.cpu().tolist(), mem.cpu().tolist()
    per_round = dict(zip(names, times))

    if info.is_main:
        mem_kind = "CUDA max_memory_allocated" if info.device.type == "cuda" else "RSS"
        print(f"weight sync: preset {args.preset} ({n_params / 1e6:.2f}M params, {model_bytes / 1e6:.1f} MB fp32, "
              f"{n_tensors} tensors), world {info.world_size} ({info.backend}, {info.device.type}), "
              f"{torch.get_num_threads()} thread(s) per rank; machine: {machine(info)}; torch {torch.__version__}")
        print(f"load average (1/5/15 min) before: {load_before}, after: {load_average()}; median of {args.rounds} "
              f"interleaved rounds after 1 warm-up; floor moves {floor.bytes / 1e6:.1f} MB "
              f"({'all-gather + copy' if info.world_size > 1 else 'copy only'})")
        print(f"| path | ms per sync | MB moved | GB/s | vs naive | vs floor | peak {mem_kind} growth MB |")
        print("|---|---|---|---|---|---|---|")
        for i, p in enumerate(names):
            sec = statistics.median(per_round[p])
            vs_naive = statistics.median(n / t for n, t in zip(per_round["naive"], per_round[p]))
            vs_floor = statistics.median(f / t for f, t in zip(per_round["floor"], per_round[p]))
            print(f"| {p} | {sec * 1e3:.1f} | {model_bytes / 1e6:.1f} | {model_bytes / sec / 1e9:.2f} | "
                  f"{vs_naive:.2f}x | {vs_floor:.2f}x | {max(0.0, mem[i]) / 2**20:.1f} |")
    D.destroy_distributed()


if __name__ == "__main__":
    main()
    D.end_process(0)
