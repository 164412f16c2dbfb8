"""The demo PRMU with and without its user table ("PRMU w/o UE", the baseline), trained in the same run.

Both variants run `recipes/train_prmu.py --config recipes/configs/prmu_demo.yaml` under torchrun on the same demo
world, seed, pairs and held-out split; the table prints their held-out pairwise accuracy per set (PRP, PQP, the
"style" pairs that only the user's row can decide, the user-dependent PQP pairs whose profile shows the winner) and
the wall time, with the with-table variant's gain over the no-table baseline on the two user-decided buckets.

    python bench/prmu_demo.py [--nproc 2] [--work runs/bench_prmu] [--seeds 0] [key=value ...]

Extra key=value arguments go to both runs (e.g. init=runs/demo/sft/hf new_head=true to start from the SFT model
instead of a random "demo" preset).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from timing import machine_line  # bench/ is on sys.path: run as python bench/X.py

REPO = Path(__file__).resolve().parents[1]
BUCKETS = ("PRP", "PQP", "style", "user_dependent")


def train(nproc: int, out: Path, world: Path, seed: int, table: bool, extra: list[str]) -> tuple[dict, float]:
    args = ["--config", str(REPO / "recipes" / "configs" / "prmu_demo.yaml"), f"demo_world={world}",
            f"out_dir={out}", f"seed={seed}", f"use_user_table={str(table).lower()}", "resume=false"]
    if not any(a.startswith(("init=", "init_preset=")) for a in extra):
        args.append("init_preset=demo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "recipes" / "train_prmu.py"), *args, *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out / "final_eval.json").read_text()), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", default="runs/bench_prmu")
    ap.add_argument("--seeds", default="0")
    args, extra = ap.parse_known_args()
    print(machine_line(processes=args.nproc))
    work = Path(args.work)
    world = work / "world"
    rows = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for table in (False, True):
            name = f"{'with' if table else 'without'} table, seed {seed}"
            rows[name] = train(args.nproc, work / f"{'table' if table else 'no_table'}_s{seed}", world, seed,
                               table, extra)
    print(f"\nDemo PRMU, {args.nproc} CPU processes, recipes/configs/prmu_demo.yaml {' '.join(extra)}")
    keys = [f"{b}_acc" for b in BUCKETS]
    print("| variant | PRP acc | PQP acc | style acc | user-dependent acc | style / user-dep. vs w/o UE | held-out "
          "pairs (PRP/PQP/style/user-dep.) | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (res, wall) in rows.items():
        base = rows[name.replace("with table", "without table")][0]
        gains = " / ".join(f"{res[k] - base[k]:+.3f}" for k in ("style_acc", "user_dependent_acc"))
        counts = "/".join(str(int(res[f"{b}_pairs"])) for b in BUCKETS)
        print(f"| {name} | " + " | ".join(f"{res[k]:.3f}" for k in keys) + f" | {gains} | {counts} | {wall:.0f} |")
    if len(rows) > 2:  # the mean over seeds of each variant
        mean = {t: {k: sum(r[k] for n, (r, _) in rows.items() if n.startswith(f"{t} table")) / (len(rows) // 2)
                    for k in keys} for t in ("without", "with")}
        gains = " / ".join(f"{mean['with'][k] - mean['without'][k]:+.3f}" for k in ("style_acc", "user_dependent_acc"))
        print(f"| mean of {len(rows) // 2} seeds, without / with | "
              + " | ".join(f"{mean['without'][k]:.3f} / {mean['with'][k]:.3f}" for k in keys) + f" | {gains} | | |")


if __name__ == "__main__":
    main()
