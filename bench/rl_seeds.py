"""How much the demo table's RL rows move with the RL seed alone: both RL stages rerun over one SFT and one PRMU.

Each seed S runs the main command with `rl_seed=S out_dir=<out>/seedS` (recipes/guided_rl.py): the world, SFT and
PRMU under `--workdir` are reused as built, guided and exploratory RL draw their prompt order and samples from S, and
the evaluation table is redone. The seed the main command itself used (`--main-seed`, 0) is read from the main run
under `--workdir` instead (the main command is rerun there, which reuses every stage and redoes only the table).
Stages already built for a seed are reused, so a second call only redoes the tables.

    python bench/rl_seeds.py [--seeds 0,1,2,3,4] [--workdir runs/demo] [--out runs/rl_seeds] [--nproc 2] [key=value]
    python bench/rl_seeds.py --control --seeds 0,1,2 --out runs/rl_control     # the shuffled-reward control
    python bench/rl_seeds.py --seeds 0,1,2 --out runs/rl_abl/no_tag use_tag_reward=false   # an ablation
    python bench/rl_seeds.py --workdir runs/demo_noue --seeds 0,1,2 --out runs/rl_abl/no_ue \
        prmu_settings=use_user_table=false   # PRMU w/o UE, after cp -a runs/demo/{world,base_demo,sft} runs/demo_noue/

With key=value arguments (an ablation) or --control every seed, the main command's included, runs under --out.

Prints, per task's main metric: SFT, each seed's guided and exploratory cell, their mean and standard deviation over
the seeds, how many seeds are at or above SFT and how many are below or above it beyond the dev-user noise (the 95%
interval of recipes/guided_rl.py's rl_vs_sft excludes zero); how many dev generations pass the format gate and the
tag check; then each seed's guided-RL trend (first vs last 20% of steps), the sampled R_v per task pooled over the
seeds, and how closely each stage's advantages follow each reward term and R_v alone (group/adv_corr/<term>:
foundation, tag, prmu, r_v; "not logged" for a term that is off or an older log).
A benchmark that reports, not a test.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import machine_line  # bench/ is on sys.path: run as python bench/X.py

REPO = Path(__file__).resolve().parents[1]
ROWS = ("Guided RL", "Exploratory RL")


def guided_recipe():
    """recipes/guided_rl.py as a module: its trend helpers (first_last_share, balanced_reward_trend), its
    generation_total and, through its `recipe`, evaluate's cell style."""
    sys.path.insert(0, str(REPO / "recipes"))
    return importlib.import_module("guided_rl")


def run_seed(seed: int, root: Path, args, extra: list[str]) -> float:
    """The main command for one RL seed (its RL stages under `root`); returns its wall time in seconds."""
    script = REPO / "bench" / "rl_control.py" if args.control else REPO / "recipes" / "guided_rl.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(script), f"workdir={args.workdir}", f"rl_seed={seed}", *extra]
    if root != Path(args.workdir):
        cmd.append(f"out_dir={root}")
    t0 = time.perf_counter()
    log_path = Path(args.out) / f"seed{seed}.log"
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"rl_seeds: seed {seed} failed (exit {done.returncode}); its output is in {log_path}")
    return time.perf_counter() - t0


def read_json(path: Path) -> dict:
    if not path.exists():
        raise SystemExit(f"rl_seeds: {path} does not exist (run without --no-run to build it)")
    return json.loads(path.read_text())


def passes(g, table: dict, path: Path, row: str, key: str) -> int:
    """evaluate.generation_counts' `key` summed over the row's tasks (guided_rl.generation_total)."""
    try:
        return g.generation_total(table["counts"], row, key)
    except KeyError:
        raise SystemExit(f"rl_seeds: {path} has no {key!r} counts (written by an older evaluate.py); rerun without "
                         "--no-run to redo the tables") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--workdir", default="runs/demo", help="the main run: world, SFT, PRMU (and seed --main-seed)")
    ap.add_argument("--out", default="runs/rl_seeds", help="each other seed's RL stages and table: <out>/seed<S>")
    ap.add_argument("--main-seed", type=int, default=0, help="the RL seed of the main run under --workdir")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--control", action="store_true",
                    help="run bench/rl_control.py (rewards shuffled within each group) instead of the real stages")
    ap.add_argument("--no-run", action="store_true", help="only read the tables the seeds' runs left")
    args, extra = ap.parse_known_args()
    print(machine_line(processes=args.nproc))
    seeds = [int(s) for s in args.seeds.split(",")]
    args.workdir, args.out = str(Path(args.workdir).resolve()), str(Path(args.out).resolve())  # the runs' cwd is REPO
    Path(args.out).mkdir(parents=True, exist_ok=True)
    main_seed = None if args.control or extra else args.main_seed  # the main run is neither a control nor an ablation
    roots = {s: Path(args.workdir) if s == main_seed else Path(args.out) / f"seed{s}" for s in seeds}
    walls = {}
    for s in seeds:
        if not args.no_run:
            roots[s].mkdir(parents=True, exist_ok=True)
            walls[s] = run_seed(s, roots[s], args, extra)
            print(f"seed {s}: {walls[s]:.0f} s", flush=True)

    g = guided_recipe()
    fmt = g.recipe("evaluate")._fmt  # the table's own cell style (.517)
    paths = {s: roots[s] / "eval" / "table.json" for s in seeds}
    tables = {s: read_json(paths[s]) for s in seeds}
    diffs = {s: read_json(roots[s] / "eval" / "rl_vs_sft.json") for s in seeds}
    sft = {json.dumps(tables[s]["rows"]["SFT"], sort_keys=True) for s in seeds}
    if len(sft) != 1:
        raise SystemExit("rl_seeds: the seeds' tables have different SFT rows: they were not run over the same SFT")
    what = "CONTROL: rewards shuffled within each group (bench/rl_control.py); " if args.control else ""
    settings = f"; settings: {' '.join(extra)}" if extra else ""  # an ablation's key=value arguments
    print(f"\n{what}RL rows over RL seeds {args.seeds} (one SFT, one PRMU: {args.workdir}{settings}); cells are the "
          "dev split's main metric, greedy decoding")
    print("below / above: seeds whose 95% dev-user interval of RL - SFT lies wholly on the worse / better side of "
          "zero\n")
    print("| task | metric | SFT | row | " + " | ".join(f"seed {s}" for s in seeds)
          + " | mean | sd | >= SFT | below | above |")
    print("|---|---|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|")
    for task, d in diffs[seeds[0]].items():
        key, higher = d["metric"], d["higher_is_better"]
        base = tables[seeds[0]]["rows"]["SFT"][task][key]
        for row in ROWS:
            cells = [tables[s]["rows"][row][task][key] for s in seeds]
            at_or_above = sum((c >= base - 1e-12) if higher else (c <= base + 1e-12) for c in cells)
            worse = [(diffs[s][task][row][2] < 0) if higher else (diffs[s][task][row][1] > 0) for s in seeds]
            better = [(diffs[s][task][row][1] > 0) if higher else (diffs[s][task][row][2] < 0) for s in seeds]
            sd = statistics.stdev(cells) if len(cells) > 1 else float("nan")
            print(f"| {task} | {key} | {fmt(base)} | {row} | " + " | ".join(fmt(c) for c in cells)
                  + f" | {fmt(statistics.mean(cells))} | {fmt(sd)} | {at_or_above}/{len(seeds)} | "
                  f"{sum(worse)}/{len(seeds)} | {sum(better)}/{len(seeds)} |")

    def well_formed(s, row):  # "format_ok / tags_ok" of one seed's row
        return " / ".join(str(passes(g, tables[s], paths[s], row, key)) for key in ("format_ok", "tags_ok"))
    n = passes(g, tables[seeds[0]], paths[seeds[0]], "SFT", "generations")
    print(f"\ndev generations (of {n} per row) that pass the format gate (R_f = 1) / the tag check (R_tag = 0); SFT "
          f"{well_formed(seeds[0], 'SFT')}:")
    for row in ROWS:
        print(f"  {row:15s}" + "".join(f"  seed {s} {well_formed(s, row)}" for s in seeds))

    tasks = list(diffs[seeds[0]])
    print("\nguided RL, first vs last 20% of steps (composite reward; task-balanced composite; tag pass rate):")
    for s in seeds:
        trend = g.first_last_share(roots[s] / "guided_rl" / "metrics.jsonl",
                                   ["reward_mean", "tag_pass_rate"] + [f"reward_mean/{t}" for t in tasks])
        bal = g.balanced_reward_trend(trend, tasks)
        r, t = trend["reward_mean"], trend["tag_pass_rate"]
        wall = f"; run {walls[s]:.0f} s" if s in walls else ""
        print(f"  seed {s}: {r[0]:.3f} -> {r[1]:.3f}; {bal[0]:.3f} -> {bal[1]:.3f}; {t[0]:.3f} -> {t[1]:.3f}{wall}")

    logs = {stage: [roots[s] / stage / "metrics.jsonl" for s in seeds] for stage in ("guided_rl", "exploratory_rl")}
    print("\nsampled R_v (T = 1) per task, first vs last 20% of guided RL's steps, pooled over the seeds' responses:")
    for task, (first, last, n_first, n_last) in pooled_task_trend(g, logs["guided_rl"], tasks).items():
        print(f"  {task:7s} {first:.3f} -> {last:.3f}  ({n_first} / {n_last} responses)")
    print("\nadvantages' within-group correlation with a reward term (group/adv_corr/<term>): mean over the stage's "
          "steps (first -> last 20%):")
    for stage, terms in (("guided_rl", ("foundation", "tag", "prmu", "r_v")),
                         ("exploratory_rl", ("foundation", "r_v"))):
        for s, log in zip(seeds, logs[stage]):
            keys = [f"group/adv_corr/{term}" for term in terms]
            whole, ends = g.first_last_share(log, keys, share=1.0), g.first_last_share(log, keys)
            cells = [f"{term} {whole[k][0]:.2f} ({ends[k][0]:.2f} -> {ends[k][1]:.2f})" if not math.isnan(whole[k][0])
                     else f"{term} not logged (the term is off, or an older log)" for term, k in zip(terms, keys)]
            print(f"  {stage:14s} seed {s}: " + "; ".join(cells))


def pooled_task_trend(g, logs: list[Path], tasks: list[str], share: float = 0.2) -> dict:
    """{task: (first, last, responses in first, in last)}: each task's r_v_mean over the first and the last `share`
    of every log's steps (guided_rl.log_windows, as first_last_share), weighted by responses/<task> and pooled over
    the logs, so that each sampled response counts once."""
    sums = {t: [0.0, 0.0, 0, 0] for t in tasks}
    for log in logs:
        for w, window in enumerate(g.log_windows(log, share)):
            for row in window:
                for t in tasks:
                    count = row.get(f"responses/{t}", 0)
                    if count:
                        sums[t][w] += row[f"r_v_mean/{t}"] * count
                        sums[t][w + 2] += count
    return {t: (a / na if na else float("nan"), b / nb if nb else float("nan"), na, nb)
            for t, (a, b, na, nb) in sums.items()}


if __name__ == "__main__":
    main()
