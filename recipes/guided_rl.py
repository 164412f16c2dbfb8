"""Stage 2 -- guided RL (GSPO) with the composite reward R = alpha(R_v + R_rep)R_f + beta R_tag + gamma R_PRMU.

    torchrun --nproc_per_node=2 recipes/guided_rl.py            # the embedded demo, end to end (see below)
    torchrun --nproc_per_node=8 recipes/guided_rl.py --config recipes/configs/guided_rl_qwen3_8b.yaml

With no arguments (demo=true) this runs the whole pipeline on the built-in demo world and a tiny Qwen3, building each
missing earlier stage once and reusing it afterwards (everything lives under `workdir`):
    1. demo world (LaMP-format tasks, tokenizer, tagged chains)   2. SFT (recipes/sft.py)
    3. PRMU (recipes/train_prmu.py)   4. guided RL (this stage)   5. exploratory RL (recipes/exploratory_rl.py)
    6. evaluation table: base vs SFT vs guided vs exploratory (recipes/evaluate.py)
With demo=false it runs only Stage 2 from `policy`, `prmu` and `data_root`. The RL loop itself is
minitagpr/rl/loop.py (shared with Stage 3).
"""
from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from minitagpr import distributed as D
import torch

from minitagpr.cli import exit_on_user_error
from minitagpr.config import load_config, parse_cli, save_config
from minitagpr.rl.loop import RLConfig, parse_task_mix, train

RECIPES = Path(__file__).resolve().parent


def recipe(name: str):
    """A sibling recipe script as a module (recipes/ is a folder of scripts, not a package)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    return importlib.import_module(name)


# ----------------------------------------------------------------------------------------------- 0. config
@dataclass
class GuidedConfig(RLConfig):
    """Defaults are the embedded demo (2 CPU processes, minutes); the paper's run is configs/guided_rl_qwen3_8b.yaml."""
    demo: bool = True  # build missing stages on the demo world, then run Stage 3 and the evaluation table
    workdir: str = "runs/demo"
    rerun: bool = False  # demo: redo the RL stages and the evaluation even when their exports exist
    # demo-world RL settings (the paper's values are in the 8B YAML)
    out_dir: str = ""  # default: <workdir>/guided_rl
    tasks: str = "LaMP-1:0,LaMP-2:0,LaMP-3:0,LaMP-4:0,LaMP-5:0,LaMP-7:0"
    k: int = 4
    max_prompt_tokens: int = 512
    max_new_tokens: int = 160
    prompts_per_step: int = 16
    num_minibatches: int = 2
    micro_batch_size: int = 16
    epochs: float = 1.0
    max_steps: int = 24
    lr: float = 1e-4  # the tiny demo model; 2e-5 barely moved the reward in 24 steps (the paper: 1e-6 on Qwen3-8B)
    warmup_steps: int = 2
    save_every: int = 8
    exploratory_steps: int = 8  # demo Stage 3 length (the paper: 2 epochs)
    eval_examples: int = 0  # dev examples per task in the demo's evaluation table (0 = all 60 of the demo world)


def demo_stages(cfg: GuidedConfig) -> dict:
    """Steps 1-3 of the demo: world, SFT export and PRMU export, each built once and reused when present."""
    from minitagpr.data import demo_world
    work = Path(cfg.workdir)
    if D.world().is_main:
        demo_world.build(work / "world")  # idempotent: its manifest records what was built
    D.barrier()
    world = demo_world.build(work / "world")  # every rank: the same paths, nothing rebuilt

    sft = recipe("sft")
    sft_export = work / "sft" / "hf"
    if not (sft_export / "config.json").exists():
        D.log("[demo] 2. SFT on the demo world's tagged chains")
        sft_export = Path(sft.run(sft.SftConfig(demo_dir=str(work), out_dir=str(work / "sft"), seed=cfg.seed)))
    else:
        D.log(f"[demo] 2. SFT: reusing {sft_export}")

    prmu = recipe("train_prmu")
    prmu_export = work / "prmu" / "hf"
    if not (prmu_export / "config.json").exists():
        D.log("[demo] 3. PRMU on the demo world's preference pairs (initialised from the SFT model, new head)")
        prmu_cfg = load_config(prmu.PrmuConfig, RECIPES / "configs" / "prmu_demo.yaml",
                               {"demo_world": str(work / "world"), "init": str(sft_export), "new_head": True,
                                "out_dir": str(work / "prmu"), "seed": cfg.seed})
        prmu_export = Path(prmu.run(prmu_cfg))
    else:
        D.log(f"[demo] 3. PRMU: reusing {prmu_export}")
    return {"world": world, "base": work / "base_demo", "sft": sft_export, "prmu": prmu_export}


def evaluate_table(named: dict[str, Path], world, cfg: GuidedConfig, out_dir: Path):
    """The demo's Table 1: checkpoints are split over the ranks (each decodes greedily on its own), then merged."""
    evaluate = recipe("evaluate")
    info = D.world()
    mine = {name: path for i, (name, path) in enumerate(named.items()) if i % info.world_size == info.rank}
    tasks = [t for t, _ in parse_task_mix(cfg.tasks)]
    table = evaluate.evaluate_checkpoints(mine, tasks, data=world, limit=cfg.eval_examples,
                                          settings=((cfg.retriever, cfg.k),), max_prompt_tokens=cfg.max_prompt_tokens,
                                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, out_dir=out_dir,
                                          prompt_style=cfg.prompt_style, log=lambda *a: None)
    tables = [table]
    if info.world_size > 1:
        tables = [None] * info.world_size
        torch.distributed.all_gather_object(tables, table)
    merged = evaluate.EvalTable()
    for name in named:  # the rows in pipeline order
        for t in tables:
            if name in t.rows:
                for task, metrics in t.rows[name].items():
                    merged.add(name, task, metrics, t.settings[name], t.examples[task])
    if info.is_main:
        merged.write(out_dir, title="Demo world, dev split (greedy decoding)")
    return merged


RL_ROWS = ("Guided RL", "Exploratory RL")  # the demo table's RL rows, compared with its "SFT" row


def rl_vs_sft(world, tasks: list[str], eval_dir: Path, limit: int, rows=RL_ROWS, base: str = "SFT",
              samples: int = 2000) -> dict:
    """Each RL row minus SFT on each task's main metric, from the official-format predictions the table wrote,
    with a 95% interval from resampling the dev *users* (a paired cluster bootstrap: one user's questions share a
    profile and move together). {task: {"metric", "higher_is_better", "users", row: (diff, low, high)}}; also
    written to <eval_dir>/rl_vs_sft.json."""
    from minitagpr.data import lamp
    from minitagpr.metrics import main_metric, paired_bootstrap, per_example_scores
    evaluate = recipe("evaluate")
    out: dict = {}
    for task in tasks:
        data = evaluate.load_task_data(world, task, part="dev", limit=limit)
        users = {ex.id: ex.user for ex in data.examples}

        def scores(row):
            _, preds = lamp.load_outputs(evaluate.predictions_file(eval_dir, row, task))
            return per_example_scores(task, preds, data.golds)
        ref = scores(base)
        key, higher = main_metric(task)
        out[task] = {"metric": key, "higher_is_better": higher, "users": len(set(users.values()))}
        for row in rows:
            out[task][row] = paired_bootstrap(ref, scores(row), users, samples=samples)
    lamp.atomic_write_json(eval_dir / "rl_vs_sft.json", out)
    return out


def first_last_share(log_path: Path, keys: list[str], share: float = 0.2) -> dict[str, tuple[float, float]]:
    """Mean of each key over the first and the last `share` of logged steps (did the stage learn?). A key a step
    did not log (a task that step did not sample) is averaged over the steps that have it; NaN if none."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    n = max(1, int(round(len(rows) * share)))

    def mean(part, k):
        vals = [r[k] for r in part if k in r]
        return sum(vals) / len(vals) if vals else float("nan")
    return {k: (mean(rows[:n], k), mean(rows[-n:], k)) for k in keys}


def balanced_reward_trend(trend: dict[str, tuple[float, float]], tasks: list[str]) -> tuple[float, float]:
    """The composite reward averaged over tasks with equal weight, first vs last window: the mean of the per-task
    `reward_mean/<task>` windows. The plain `reward_mean` of a window also moves with *which* tasks its steps
    happened to sample (in the demo LaMP-1's reward is ~0.5, LaMP-2's ~0), which this removes."""
    pairs = [trend[f"reward_mean/{t}"] for t in tasks if f"reward_mean/{t}" in trend]
    pairs = [p for p in pairs if not (math.isnan(p[0]) or math.isnan(p[1]))]  # drop tasks a window never sampled
    if not pairs:
        return float("nan"), float("nan")
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def train_or_reuse(stage: str, what: str, cfg: RLConfig, rerun: bool) -> Path:
    """Run one RL stage of the demo unless its HF export already exists (or rerun=true); its export folder."""
    export = Path(cfg.out_dir) / "export"
    if rerun or not (export / "config.json").exists():
        D.log(f"[demo] {stage} {what}")
        return train(cfg)
    D.log(f"[demo] {stage}: reusing {export}")
    return export


def print_demo_report(cfg: GuidedConfig, guided_cfg: GuidedConfig, paths: dict, work: Path, table) -> None:
    """Rank 0, after the process group is gone: the guided stage's trends, the table, and RL minus SFT."""
    tasks = [t for t, _ in parse_task_mix(cfg.tasks)]
    trend = first_last_share(Path(guided_cfg.out_dir) / "metrics.jsonl",
                             ["reward_mean", "tag_pass_rate", "format_pass_rate", "r_prmu_mean"]
                             + [f"r_v_mean/{t}" for t in tasks] + [f"reward_mean/{t}" for t in tasks])
    balanced = balanced_reward_trend(trend, tasks)
    print("\n[demo] guided RL, first vs last 20% of steps:")
    for key, (first, last) in trend.items():
        if not key.startswith("reward_mean/"):
            print(f"  {key:18s} {first:.3f} -> {last:.3f}")
    print(f"  {'reward, balanced':18s} {balanced[0]:.3f} -> {balanced[1]:.3f}  (each task weighs the same; "
          "reward_mean above also moves with the tasks a step sampled)")
    print("  (r_v_mean/<task>: the task's verifiable reward of sampled responses, T = 1; the table below "
          "decodes greedily)")
    print(f"\n[demo] evaluation ({work / 'eval' / 'table.md'}):\n{table.markdown()}")
    diffs = rl_vs_sft(paths["world"], tasks, work / "eval", cfg.eval_examples)
    users = max(d["users"] for d in diffs.values())
    print(f"\n[demo] RL minus SFT on each task's main metric, 95% interval from resampling the {users} dev "
          "users (2,000 draws):")
    for task, d in diffs.items():
        sense = "higher is better" if d["higher_is_better"] else "lower is better"
        cells = "   ".join(f"{row} {d[row][0]:+.3f} [{d[row][1]:+.3f}, {d[row][2]:+.3f}]" for row in RL_ROWS)
        print(f"  {task:7s} {d['metric']:8s} {cells}   ({sense})")


def main(argv: list[str]) -> None:
    cfg = parse_cli(GuidedConfig, argv)
    if not cfg.demo and not any(a == "--config" or a.startswith(("config=", "--config=")) for a in argv):
        raise SystemExit("demo=false runs need --config FILE.yaml (e.g. recipes/configs/guided_rl_qwen3_8b.yaml): "
                         "the built-in defaults are the demo's")
    if cfg.stage != "guided":
        raise SystemExit("recipes/guided_rl.py runs stage=guided; use recipes/exploratory_rl.py for Stage 3")
    info = D.init_distributed()
    report = None
    try:
        if not cfg.demo:
            if not (cfg.policy and cfg.data_root and (cfg.prmu or not cfg.use_prmu or cfg.gamma == 0)):
                raise SystemExit("demo=false needs policy=, data_root= and prmu= (or use_prmu=false)")
            train(replace(cfg, out_dir=cfg.out_dir or "runs/guided_rl"))
            return
        # 1-3. earlier stages, built once
        paths = demo_stages(cfg)
        work = Path(cfg.workdir)
        guided_cfg = replace(cfg, policy=str(paths["sft"]), prmu=str(paths["prmu"]), data_root=str(work / "world"),
                             prompt_style=paths["world"].params["prompt_style"],  # the style SFT trained on
                             out_dir=cfg.out_dir or str(work / "guided_rl"))
        if info.is_main:
            save_config(guided_cfg, Path(guided_cfg.out_dir) / "config.yaml")
        # 4. guided RL (Stage 2)
        if cfg.rerun:  # start the RL stages over, not from their last checkpoints
            guided_cfg = replace(guided_cfg, resume=False)
        guided_export = train_or_reuse("4. guided RL", "(GSPO, composite reward)", guided_cfg, cfg.rerun)
        # 5. exploratory RL (Stage 3): foundation reward from the guided checkpoint
        explore_cfg = replace(guided_cfg, stage="exploratory", policy=str(guided_export), prmu="", use_prmu=False,
                              use_tag_reward=False, out_dir=str(work / "exploratory_rl"), max_steps=cfg.exploratory_steps,
                              save_every=0)
        explore_export = train_or_reuse("5. exploratory RL", "(GSPO, foundation reward)", explore_cfg, cfg.rerun)
        # 6. evaluation table on the demo world's dev split
        D.log("[demo] 6. evaluation: base vs SFT vs guided vs exploratory on the demo dev sets")
        table = evaluate_table({"Base": paths["base"], "SFT": paths["sft"], "Guided RL": guided_export,
                                "Exploratory RL": explore_export}, paths["world"], guided_cfg, work / "eval")
        report = (guided_cfg, paths, work, table)
    finally:
        D.destroy_distributed()
    if report is not None and info.is_main:  # no collectives in it: a failure there leaves no rank waiting
        print_demo_report(cfg, *report)


if __name__ == "__main__":
    with exit_on_user_error("guided_rl"):
        main(sys.argv[1:])
    D.end_process()  # skip interpreter finalization (see there)
