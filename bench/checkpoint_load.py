"""Checkpoint loading (minitagpr.model.checkpoint.load_pretrained): ours vs transformers' from_pretrained and
safetensors' load_file, same HF folder, time and peak memory, each load in a fresh process.

Paths (each reads the folder from disk into fp32 CPU tensors):
  safetensors      safetensors.torch.load_file: the tensors only, no model (the floor for reading the file)
  transformers     Qwen3ForCausalLM.from_pretrained(dtype=float32): the reference loader
  ours             load_pretrained(dtype=float32): header and shape checks first, then one tensor at a time read
                   straight into its parameter (no memory map)
A fresh process per load (`--repeats` of them per path, interleaved path by path), so no load finds another's pages
in its heap; the file itself stays in the OS page cache after the first read, so every load after the warm-up reads
from memory, not the disk. safetensors and transformers map the file and read a page only when it is first used:
each path's timed region is the load plus one touch of every 4 KiB page of every tensor (what the first forward
does anyway), so all three have read the whole checkpoint when the clock stops. Time: median over processes
(imports and interpreter start-up excluded); "vs transformers" is transformers' median time over the path's. Peak:
the resident set's high-water mark (VmHWM) over load + touch, above the resident set before it, mapped file pages
included; with the checkpoint's size beside it (README: peak = model + one tensor).

    python bench/checkpoint_load.py [--preset qwen3-0.6b-2layer] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from timing import PeakMemory, child_output, machine_line  # noqa: E402

PATHS = ["safetensors", "transformers", "ours"]


def child(path: str, folder: Path) -> dict:
    """One load in this (fresh) process: seconds and peak resident-set growth in MiB."""
    import torch

    torch.set_num_threads(1)
    if path == "safetensors":
        from safetensors.torch import load_file
        load = lambda: [load_file(f) for f in sorted(folder.glob("*.safetensors"))]  # noqa: E731  (every shard)
    elif path == "transformers":
        import transformers
        load = lambda: transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32)  # noqa: E731
    else:
        from minitagpr.model import load_pretrained
        load = lambda: load_pretrained(folder, dtype=torch.float32)  # noqa: E731

    def touch(loaded) -> float:  # one float of every 4 KiB page of every tensor
        tensors = (loaded.parameters() if isinstance(loaded, torch.nn.Module)
                   else (t for shard in loaded for t in shard.values()))
        return sum(float(t.detach().reshape(-1)[::1024].sum()) for t in tensors)

    memory = PeakMemory("cpu")
    memory.start()
    t0 = time.perf_counter()
    loaded = load()
    touch(loaded)
    seconds = time.perf_counter() - t0
    peak = memory.peak() / 2**20
    del loaded
    return {"s": seconds, "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-0.6b-2layer", help="minitagpr.model.presets name of the checkpoint")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder))))
        return
    print(machine_line())
    from minitagpr.model.presets import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_checkpoint(Path(tmp) / "ckpt", preset=args.preset)
        size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        config = json.loads((folder / "config.json").read_text())
        runs: dict[str, list[dict]] = {p: [] for p in PATHS}
        for _ in range(args.repeats + 1):  # the first round warms the page cache and the imports' own caches
            for path in PATHS:
                runs[path].append(json.loads(child_output([__file__, "--child", path, "--folder", str(folder)])))
    runs = {p: r[1:] for p, r in runs.items()}
    base = statistics.median(r["s"] for r in runs["transformers"])
    print(f"{args.preset} checkpoint ({size_mb:,.0f} MiB of fp32 safetensors, vocab {config['vocab_size']:,}, "
          f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, tied head: "
          f"{config['tie_word_embeddings']}), median of {args.repeats} fresh processes per path after one warm-up")
    print("| path | load + touch s | vs transformers | peak RSS growth MiB | peak / checkpoint size |")
    print("|---|---|---|---|---|")
    for path in PATHS:
        s = statistics.median(r["s"] for r in runs[path])
        peak = statistics.median(r["peak_mb"] for r in runs[path])
        print(f"| {path} | {s:.3f} | {base / s:.2f}x | {peak:,.0f} | {peak / size_mb:.2f}x |")


if __name__ == "__main__":
    main()
