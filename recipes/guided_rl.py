"""Stage 2 -- guided RL (GSPO) with the composite reward R = alpha(R_v + R_rep)R_f + beta R_tag + gamma R_PRMU.

    torchrun --nproc_per_node=2 recipes/guided_rl.py            # the embedded demo, end to end (see below)
    torchrun --nproc_per_node=8 recipes/guided_rl.py --config recipes/configs/guided_rl_qwen3_8b.yaml

With no arguments (demo=true) this runs the whole pipeline on the built-in demo world and a tiny Qwen3 (everything
under `workdir`; the RL stages and the table under `out_dir` when given, sharing the world, SFT and PRMU):
    1. demo world (LaMP-format tasks, tokenizer, tagged chains)   2. SFT (recipes/sft.py)
    3. PRMU (recipes/train_prmu.py)   4. guided RL (this stage)   5. exploratory RL (recipes/exploratory_rl.py)
    6. evaluation table: base vs SFT vs guided vs exploratory (recipes/evaluate.py)
Stages 2-5 are built once and reused afterwards, each only for the settings and earlier stages it was built from
(minitagpr/stages.py: `stage.json` in each stage folder): other settings are refused by name, a rebuilt earlier stage
rebuilds every later one, an interrupted stage resumes. `rerun=true` redoes both RL stages; the table is always redone.
With demo=false it runs only Stage 2 from `policy`, `prmu` and `data_root`, and every key left unset takes RLConfig's
default (the paper's), not the demo's. The RL loop itself is minitagpr/rl/loop.py (shared with Stage 3).
"""
from __future__ import annotations

import importlib
import json
import math
import shlex
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from minitagpr import distributed as D
from minitagpr import stages
from minitagpr.atomic import atomic_write_json
from minitagpr.cli import exit_on_user_error
from minitagpr.config import ConfigError, load_config, parse_cli
from minitagpr.rewards import TERMS
from minitagpr.rl import loop
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
    workdir: str = "runs/demo"  # demo: the world, the base model, SFT and PRMU (and the RL stages and table unless
    #                             out_dir is set); stages found there are reused for the same settings
    rerun: bool = False  # demo: redo both RL stages even when their exports exist (the table is always redone)
    # demo-world RL settings (the paper's values are in the 8B YAML)
    out_dir: str = ""  # demo: folder of this run's guided_rl/, exploratory_rl/, eval/ (default: workdir);
    #                    demo=false: the stage's folder (default runs/guided_rl)
    tasks: str = "LaMP-1:0,LaMP-2:0,LaMP-3:0,LaMP-4:0,LaMP-5:0,LaMP-7:0"  # count 0 = every question of the task
    k: int = 4  # retrieved profile items per prompt (0 = none; the paper: 8)
    max_prompt_tokens: int = 512  # prompt budget: the least relevant profile items are dropped to fit (8B YAML: 4096)
    max_new_tokens: int = 160  # response cap in tokens; a response cut here gets R_f = 0 (8B YAML: 2048)
    prompts_per_step: int = 16
    num_minibatches: int = 2
    micro_batch_size: int = 16
    epochs: float = 1.0
    max_steps: int = 24
    lr: float = 1e-4  # the tiny demo model; 2e-5 barely moved the reward in 24 steps (the paper: 1e-6 on Qwen3-8B)
    warmup_steps: int = 2
    save_every: int = 8
    exploratory_steps: int = 8  # demo: Stage 3's max_steps, a cap on its RL steps (the paper: 2 epochs)
    eval_examples: int = 0  # dev examples per task in the demo's evaluation table (0 = all 60 of the demo world)
    rl_seed: int = -1  # demo: the RL stages' seed (prompt order, samples; -1 = seed). seed= also reseeds SFT and PRMU;
    #                    rl_seed= with out_dir= reruns only the RL stages over the same SFT and PRMU (bench/rl_seeds.py)
    sft_settings: str = ""  # demo: SFT's settings other than its defaults, as "key=value key=value" (recipes/sft.py
    #                         --help; e.g. "max_steps=200"); the demo sets its inputs, out_dir and seed
    prmu_settings: str = ""  # demo: the same for PRMU, over configs/prmu_demo.yaml (recipes/train_prmu.py --help)
    prompt_style: str = ""  # "full" | "brief"; "": the demo world's (demo: the style SFT trained on, which the RL
    #                         stages and the table use; another is refused), "full" with demo=false

    def __post_init__(self):
        given = self.prompt_style
        self.prompt_style = given or "full"  # RLConfig checks a concrete style
        super().__post_init__()
        if self.demo and not given:
            self.prompt_style = ""  # resolved to the world's style once the world is built (main)
        if self.exploratory_steps < 1:  # here, not after the world, SFT, PRMU and guided RL have run
            raise ConfigError(f"exploratory_steps={self.exploratory_steps}: Stage 3's RL steps must be >= 1")
        if self.eval_examples < 0:
            raise ConfigError(f"eval_examples={self.eval_examples}: examples per task must be >= 0 (0 = all)")
        if self.demo and not self.workdir.strip():  # Path("") is the current folder: six stage folders in it
            raise ConfigError("workdir= is empty: give the demo a folder for its stages (default runs/demo)")
        if self.demo and self.part != "train":  # the table scores the dev questions: RL would train on them
            raise ConfigError(f"part={self.part}: the demo's table scores the dev questions, so its RL stages draw "
                              "their prompts from part=train")


@dataclass
class GuidedStageConfig(GuidedConfig):
    """demo=false: Stage 2 alone. The keys the demo changes above take RLConfig's defaults (the paper's) back, so a
    YAML that leaves one out trains with the paper's value, never silently with the tiny demo's."""
    tasks: str = RLConfig.tasks
    k: int = RLConfig.k
    max_prompt_tokens: int = RLConfig.max_prompt_tokens
    max_new_tokens: int = RLConfig.max_new_tokens
    prompts_per_step: int = RLConfig.prompts_per_step
    num_minibatches: int = RLConfig.num_minibatches
    micro_batch_size: int = RLConfig.micro_batch_size
    epochs: float = RLConfig.epochs
    max_steps: int = RLConfig.max_steps
    lr: float = RLConfig.lr
    warmup_steps: int = RLConfig.warmup_steps
    save_every: int = RLConfig.save_every


# Keys left out of a stage's stamp: those that never change what the stage builds (paths the demo derives from
# workdir, plumbing, memory knobs, the demo driver's own keys). A resume may also change max_steps, the RL engine and
# prmu_max_len, SFT's export_dtype and PRMU's new_head / input files, but those change the result: they stay in the
# stamp.
RL_PLUMBING = (loop.RESUMABLE_KEYS - {"max_steps", "engine", "prmu_max_len"}) | {
    "demo", "workdir", "rerun", "eval_examples", "exploratory_steps", "rl_seed",  # (seed holds rl_seed)
    "sft_settings", "prmu_settings"}  # (in SFT's, PRMU's stamps)
CONFIG_DEFAULTS = {f.name: f.default for f in fields(GuidedConfig)}
DEMO_ONLY = ("workdir", "rerun", "exploratory_steps", "eval_examples", "sft_settings", "prmu_settings")  # (and rl_seed)
# The SFT and PRMU keys the demo sets itself (from workdir, its own stages and seed=): refused in sft_settings= and
# prmu_settings=, which would otherwise train them on other data or out of the stage folders.
DEMO_OWNED = {"sft_settings": ("model", "tokenizer", "data", "demo_dir", "out_dir", "seed"),
              "prmu_settings": ("pairs", "heldout_pairs", "demo_world", "tokenizer", "init", "init_preset", "new_head",
                                "out_dir", "seed")}


def stage_dirs(work: Path, root: Path) -> dict[str, tuple[Path, Path]]:
    """(folder, export) of each demo stage: SFT and PRMU shared under workdir, this run's RL stages under root."""
    return {"sft": (work / "sft", work / "sft" / "hf"), "prmu": (work / "prmu", work / "prmu" / "hf"),
            "guided": (root / "guided_rl", root / "guided_rl" / "export"),
            "exploratory": (root / "exploratory_rl", root / "exploratory_rl" / "export")}


def build_or_reuse(step: str, where: tuple[Path, Path], cfg, ignore: set[str], upstream: dict, run_fn,
                   rerun: bool = False, rerun_hint: str = "", fresh_also=(), check=None) -> tuple[Path, str]:
    """One demo stage in `where` = (folder, export): reuse its export when `stages.plan` allows, else `check()`
    and run `run_fn(cfg with resume)`, stamped before and after. Returns (export folder, build id)."""
    folder, export = where
    settings = stages.settings(cfg, ignore)
    plan = stages.plan(folder, export, settings, upstream, rerun=rerun, rerun_hint=rerun_hint,
                       default_settings=stages.defaults(type(cfg), ignore))  # every rank
    D.log(f"[demo] {step}: {plan.reason}")
    if plan.reuse:
        return export, plan.build
    if check is not None:  # every rank: all stop together
        check()
    plan = replace(plan, build=D.broadcast_object(plan.build))  # rank 0's new build id, on every rank
    D.barrier()  # every rank has read the old stamp before rank 0 replaces it
    D.on_main(lambda: stages.begin(folder, export, plan, step, settings, upstream, fresh_also))
    out = Path(run_fn(replace(cfg, resume=cfg.resume and plan.resume)))
    D.on_main(lambda: stages.finish(folder))
    return out, plan.build


def demo_stages(cfg: GuidedConfig, dirs: dict[str, tuple[Path, Path]]) -> dict:
    """Steps 1-3 of the demo: world, SFT export and PRMU export, each built once and reused for the same settings.
    The world always has demo_world's default parameters (its own seed 0): `seed=` varies the training stages and
    the evaluation's sampling, not the data."""
    from minitagpr.data import demo_world
    work = Path(cfg.workdir)
    sft, prmu = recipe("sft"), recipe("train_prmu")
    uses_prmu = cfg.uses_prmu  # the ablations without R_PRMU neither build nor read one
    sft_cfg = stage_config(sft.SftConfig, None, "sft_settings", cfg.sft_settings,
                           {"demo_dir": str(work), "out_dir": str(dirs["sft"][0]), "seed": cfg.seed})
    prmu_cfg = None if not uses_prmu else stage_config(
        prmu.PrmuConfig, RECIPES / "configs" / "prmu_demo.yaml", "prmu_settings", cfg.prmu_settings,
        {"demo_world": str(work / "world"), "new_head": True, "out_dir": str(dirs["prmu"][0]), "seed": cfg.seed})
    # Whether a batch splits over this run's ranks matters only to a stage that trains: checked when one will (a
    # finished workdir is reused by any number of processes), both before SFT trains, as PRMU then rebuilds too
    ranks = D.world().world_size
    sft_split = named_check("sft_settings", lambda: sft.accumulation_steps(sft_cfg, ranks))
    prmu_split = named_check("prmu_settings", lambda: prmu.check_batch_split(prmu_cfg, ranks) if uses_prmu else None)
    built = D.on_main(lambda: demo_world.build(work / "world"))  # idempotent: its manifest records what was built
    world = demo_world.build(work / "world")  # every rank: the same paths, nothing rebuilt
    if built is not None:  # rank 0, which built it or found it up to date
        D.log(f"[demo] 1. demo world {world.root}: {'reused' if built.reused else 'built'} (fingerprint "
              f"{world.fingerprint})")
    builds = {"world": world.fingerprint}

    sft_export, builds["sft"] = build_or_reuse(
        "2. SFT on the demo world's tagged chains", dirs["sft"], sft_cfg,
        sft.RESUMABLE_KEYS - {"model", "tokenizer", "data", "export_dtype", "truncate_long", "drop_long"},
        {"world": builds["world"]}, sft.run,
        fresh_also=[work / f"base_{sft_cfg.demo_preset}"],  # the base model SFT starts from (the table's Base row)
        check=lambda: (sft_split(), prmu_split()))
    # a reused SFT whose base was deleted since: the same base again (the table's Base row)
    D.on_main(lambda: sft.ensure_demo_base(sft_cfg, world))

    prmu_export = None
    if uses_prmu:
        prmu_cfg = replace(prmu_cfg, init=str(sft_export))  # (init is DEMO_OWNED: the user's text cannot set it)
        prmu_export, builds["prmu"] = build_or_reuse(
            "3. PRMU on the demo world's preference pairs (from the SFT model, new head)", dirs["prmu"], prmu_cfg,
            prmu.RESUMABLE_KEYS - {"pairs", "heldout_pairs", "tokenizer", "new_head", "init_preset"}, dict(builds),
            prmu.run, check=prmu_split)
    else:
        D.log(f"[demo] 3. PRMU: not needed (use_prmu={cfg.use_prmu}, gamma={cfg.gamma:g}: guided RL reads none)")
    return {"world": world, "base": Path(sft_cfg.demo_dir) / f"base_{sft_cfg.demo_preset}", "sft": sft_export,
            "prmu": prmu_export, "builds": builds}


def named_check(key: str, check):
    """`check` with its ConfigError prefixed by `key` (the setting the user changes to fix it)."""
    def run():
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
    return run


def stage_config(cls: type, yaml_file: Path | None, key: str, text: str, demo: dict):
    """An earlier demo stage's config: its defaults, `yaml_file`, the user's `key`= text ("k=v k=v", shell-quoted)
    and the demo's own keys `demo`, which the text may not set (DEMO_OWNED). Errors name `key` (as `named_check`'s
    do for the checks a stage that will train gets, e.g. that its batch splits over the ranks)."""
    assert set(demo) <= set(DEMO_OWNED[key]), f"{key}: the demo sets keys DEMO_OWNED does not list"
    user: dict[str, str] = {}
    try:
        tokens = shlex.split(text)
    except ValueError as err:  # an unbalanced quote
        raise ConfigError(f"{key}: {text!r}: {err}") from None
    for token in tokens:
        name, sep, value = token.partition("=")
        if not sep or not name:
            raise ConfigError(f"{key}: {token!r} is not of the form key=value")
        if name in DEMO_OWNED[key]:
            raise ConfigError(f"{key}: {name} is set by the demo itself ({', '.join(DEMO_OWNED[key])} come from "
                              "workdir=, the earlier stages and seed=)")
        if name in user:
            raise ConfigError(f"{key}: {name} is given twice")
        user[name] = value
    try:
        return load_config(cls, yaml_file, {**user, **demo})
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


def evaluate_table(named: dict[str, Path], world, cfg: GuidedConfig, out_dir: Path):
    """The demo's Table 1: checkpoints are split over the ranks (each decodes greedily on its own), then merged.
    Always the built-in fp32 engine, as configs/eval_demo.yaml: fp32 greedy decoding on a CPU and a GPU alike (bf16
    vLLM breaks greedy ties otherwise; the last bits still differ between devices and CPU instruction sets), and no
    rank builds vLLM engines that the others do not (vLLM's launcher sets up groups collectively, and the ranks hold
    unequal numbers of checkpoints when the world size does not divide 4)."""
    evaluate = recipe("evaluate")
    info = D.world()
    mine = {name: path for i, (name, path) in enumerate(named.items()) if i % info.world_size == info.rank}
    tasks = [t for t, _ in parse_task_mix(cfg.tasks)]
    table = D.on_every_rank(lambda: evaluate.evaluate_checkpoints(  # one rank's failure stops all, not at the gather
        mine, tasks, data=world, limit=cfg.eval_examples, settings=((cfg.retriever, cfg.k),),
        max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, out_dir=out_dir,
        prompt_style=cfg.prompt_style, engine="builtin", log=lambda *a: None))
    tables = [table]
    if info.world_size > 1:
        tables = [None] * info.world_size
        torch.distributed.all_gather_object(tables, table)
    merged = evaluate.EvalTable(machine=table.machine)  # every rank's is the same: one machine, all processes
    for name in named:  # the rows in pipeline order
        for t in tables:
            if name in t.rows:
                for task, metrics in t.rows[name].items():
                    merged.add(name, task, metrics, t.settings[name], t.examples[task],
                               counts=t.counts.get(name, {}).get(task),  # how many the length limit cut
                               source=t.sources.get(name, {}).get(task))  # the questions and golds it read
    add_rule_rows(merged, world, cfg)
    if info.is_main:
        merged.write(out_dir, title="Demo world, dev split (greedy decoding)")
    return merged


RULE_ROWS = ("Rule: no profile", "Rule: profile")  # reference rows of the demo table: the world's rules, no model


def add_rule_rows(table, world, cfg: GuidedConfig) -> None:
    """Two reference rows under the models: what the demo world's own rules score on the same dev questions, with
    the table's retriever and k (demo_world.rule_predictions). "Rule: no profile" is the best of the profile-blind
    answers and the constant labels, picked per task on these questions (optimistic); "Rule: profile" reads the
    profile items the prompts show."""
    from minitagpr.data import demo_world
    from minitagpr.metrics import evaluate as score
    evaluate = recipe("evaluate")
    for task, _ in parse_task_mix(cfg.tasks):
        golds = evaluate.load_task_data(world, task, part="dev", limit=cfg.eval_examples).golds  # the scored ones
        aware, blind_name, blind = demo_world.rule_predictions(world, task, "dev", cfg.k, retriever=cfg.retriever,
                                                               seed=cfg.seed, ids=list(golds))
        for row, preds, rule in ((RULE_ROWS[0], blind, blind_name), (RULE_ROWS[1], aware, "aware_answer")):
            table.add(row, task, score(task, preds, golds), {"rule": "demo_world.rule_predictions"}, len(golds))
            table.settings[row].setdefault("per_task", {})[task] = rule
    table.notes.append(f"{RULE_ROWS[0]} / {RULE_ROWS[1]}: no model -- the demo world's own rules on the same "
                       "questions: the best profile-blind answer or constant label (picked per task on these "
                       f"questions) / the profile-aware rule over the {cfg.k} items the prompts show "
                       "(demo_world.rule_predictions).")


def distinct_answers(eval_dir: Path, rows, tasks: list[str]) -> dict[str, dict[str, int]]:
    """{row: {task: distinct answers among its predictions}}, also written to <eval_dir>/distinct_answers.json: a
    row with one answer on a label task scores exactly what that constant label scores."""
    from minitagpr.data import lamp
    evaluate = recipe("evaluate")
    out = {row: {task: len(set(lamp.load_outputs(evaluate.predictions_file(eval_dir, row, task))[1].values()))
                 for task in tasks} for row in rows}
    atomic_write_json(eval_dir / "distinct_answers.json", out)
    return out


def generation_total(counts: dict, row: str, key: str) -> int:
    """One of evaluate.generation_counts' counts (`generations`, `format_ok`, `tags_ok`, ...) summed over a row's
    tasks; `counts` is an EvalTable's (or its table.json's) {row: {task: counts}}."""
    return sum(c[key] for c in counts.get(row, {}).values())


def well_formed_lines(table, rows) -> list[str]:
    """Per row, how many of its dev generations pass the RL stages' format gate (R_f = 1) and tag check (R_tag = 0)."""
    n = {row: generation_total(table.counts, row, "generations") for row in rows}
    return [f"{row:16s} format {generation_total(table.counts, row, 'format_ok'):5d} / {n[row]}   "
            f"tags {generation_total(table.counts, row, 'tags_ok'):5d} / {n[row]}" for row in rows]


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
    atomic_write_json(eval_dir / "rl_vs_sft.json", out)
    return out


def first_last_share(log_path: Path, keys: list[str], share: float = 0.2) -> dict[str, tuple[float, float]]:
    """Mean of each key over the first and the last `share` of logged steps (did the stage learn?). A per-task mean
    (`reward_mean/<task>`, `r_v_mean/<task>`) is weighted by the step's `responses/<task>` (a step that sampled one
    prompt of the task counts a fifth as much as one that sampled five), when every step of the window logged that
    count (steps logged before the count existed weigh alike); a key a step did not log (a task that step did not
    sample) is averaged over the steps that have it; NaN if none."""
    first, last = log_windows(log_path, share)

    def mean(part, k):
        part = [r for r in part if k in r]
        count = f"responses/{k.split('/', 1)[1]}" if k.startswith(PER_TASK_MEANS) else None
        weights = [r[count] for r in part] if count and all(count in r for r in part) else [1.0] * len(part)
        total = sum(weights)
        return sum(r[k] * w for r, w in zip(part, weights)) / total if total else float("nan")
    return {k: (mean(first, k), mean(last, k)) for k in keys}


def log_windows(log_path: Path, share: float = 0.2) -> tuple[list[dict], list[dict]]:
    """The first and the last `share` of a metrics.jsonl's steps (at least one each; round(share x steps))."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    n = max(1, int(round(len(rows) * share)))
    return rows[:n], rows[-n:]


PER_TASK_MEANS = ("reward_mean/", "r_v_mean/")  # the logged per-task means over a task's responses


def balanced_reward_trend(trend: dict[str, tuple[float, float]], tasks: list[str]) -> tuple[float, float]:
    """The composite reward averaged over tasks with equal weight, first vs last window: the mean of the per-task
    `reward_mean/<task>` windows. The plain `reward_mean` of a window also moves with *which* tasks its steps
    happened to sample (in the demo LaMP-1's reward is ~0.5, LaMP-2's ~0), which this removes."""
    pairs = [trend[f"reward_mean/{t}"] for t in tasks if f"reward_mean/{t}" in trend]
    pairs = [p for p in pairs if not (math.isnan(p[0]) or math.isnan(p[1]))]  # drop tasks a window never sampled
    if not pairs:
        return float("nan"), float("nan")
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def trend_lines(trend: dict[str, tuple[float, float]], tasks: list[str]) -> list[str]:
    """The report's lines for the guided stage's first_last_share trends: each overall key, the task-balanced
    reward, and the advantages' correlation with each reward term (`group/adv_corr/<term>`; the line is left out
    when the log predates it)."""
    def value(x: float) -> str:  # NaN: no step of the window logged it (a short run that never sampled the task)
        return "n/a" if math.isnan(x) else f"{x:.3f}"
    lines = [f"{key:18s} {value(first)} -> {value(last)}" for key, (first, last) in trend.items()
             if not key.startswith(("reward_mean/", "group/"))]
    balanced = balanced_reward_trend(trend, tasks)
    lines.append(f"{'reward, balanced':18s} {value(balanced[0])} -> {value(balanced[1])}  (each task weighs the same; "
                 "reward_mean above also moves with the tasks a step sampled)")
    corrs = {k.rsplit("/", 1)[1]: v for k, v in trend.items()
             if k.startswith("group/") and not any(math.isnan(x) for x in v)}
    if corrs:
        lines.append("advantage vs term  " + "; ".join(f"{term} {first:.2f} -> {last:.2f}"
                                                       for term, (first, last) in corrs.items()))
    lines.append("(r_v_mean/<task>: the task's verifiable reward of sampled responses, T = 1, n/a where a window never "
                 "sampled the task; the table below decodes greedily." + (" advantage vs term: the within-group correlation of the advantages with each term "
                 "of R, foundation = alpha (R_v + R_rep) R_f, tag = beta R_tag, prmu = gamma R_PRMU, and with R_v "
                 "alone)" if corrs else ")"))
    return lines


def print_demo_report(cfg: GuidedConfig, guided_cfg: GuidedConfig, paths: dict, root: Path, table) -> None:
    """Rank 0, after the process group is gone: the guided stage's trends, the table, and RL minus SFT."""
    tasks = [t for t, _ in parse_task_mix(cfg.tasks)]
    trend = first_last_share(Path(guided_cfg.out_dir) / "metrics.jsonl",
                             ["reward_mean", "tag_pass_rate", "format_pass_rate", "r_prmu_mean"]
                             + [f"r_v_mean/{t}" for t in tasks] + [f"reward_mean/{t}" for t in tasks]
                             + [f"group/adv_corr/{term}" for term in (*TERMS["composite"], "r_v")])
    print("\n[demo] guided RL, first vs last 20% of steps:")
    for line in trend_lines(trend, tasks):
        print("  " + line)
    print(f"\n[demo] evaluation ({root / 'eval' / 'table.md'}):\n{table.markdown()}")
    print(f"Decoded on: {D.describe_machine(table.machine)}. Reruns on this kind of machine print this table "
          "again; another CPU's vector kernels (AVX2 or AVX-512) or a GPU round differently, and the cells may "
          "differ.\n")
    models = [row for row in table.rows if row not in RULE_ROWS]
    distinct = distinct_answers(root / "eval", models, tasks)
    print(f"[demo] distinct answers among the {max(table.examples.values())} dev questions of each task (one answer "
          "to every question of a label task scores what that constant scores):")
    print("  " + f"{'':16s}" + "".join(f"{t:>8s}" for t in tasks))
    for row, per_task in distinct.items():
        print(f"  {row:16s}" + "".join(f"{per_task[t]:8d}" for t in tasks))
    print("[demo] dev generations that pass the format gate (R_f = 1) and the tag check (R_tag = 0), which guided RL's "
          "R_f and R_tag reward and no task metric shows:")
    for line in well_formed_lines(table, models):
        print("  " + line)
    diffs = rl_vs_sft(paths["world"], tasks, root / "eval", cfg.eval_examples)
    users = max(d["users"] for d in diffs.values())
    print(f"\n[demo] RL minus SFT on each task's main metric, 95% interval from resampling the {users} dev "
          f"user{'s' * (users != 1)} (2,000 draws):")
    for task, d in diffs.items():
        sense = "higher is better" if d["higher_is_better"] else "lower is better"
        cells = "   ".join(f"{row} {d[row][0]:+.3f} [{d[row][1]:+.3f}, {d[row][2]:+.3f}]" for row in RL_ROWS)
        print(f"  {task:7s} {d['metric']:8s} {cells}   ({sense})")


def parse_config(argv: list[str]) -> GuidedConfig:
    """The arguments over the defaults they run with: the demo's (GuidedConfig) or, with demo=false, the paper's
    (GuidedStageConfig), so that each is checked against those (num_minibatches=32 is fine beside the paper's 128
    prompts per step, not beside the demo's 16)."""
    if any(arg in ("-h", "--help") for arg in argv):
        return parse_cli(GuidedConfig, argv)  # prints the demo's defaults and exits
    try:
        stage, stage_error = parse_cli(GuidedStageConfig, argv), None
    except ConfigError as err:
        stage, stage_error = None, err
    if stage is not None and not stage.demo:
        return stage
    cfg = parse_cli(GuidedConfig, argv)  # a demo run: its error, if any
    if not cfg.demo:  # valid over the demo's defaults, not over the paper's it runs with
        raise stage_error
    return cfg


def main(argv: list[str]) -> None:
    cfg = parse_config(argv)
    if cfg.stage != "guided":
        raise ConfigError("recipes/guided_rl.py runs stage=guided; use recipes/exploratory_rl.py for Stage 3")
    given = [k for k in ("policy", "prmu", "data_root") if cfg.demo and getattr(cfg, k)]
    if given:  # the demo builds its own policy, PRMU and data: a given one would be silently left unused
        raise ConfigError(f"{'=, '.join(given)}= given, but the demo (demo=true, the default) builds its own policy, PRMU "
                          "and data under workdir=; to run Stage 2 on yours: demo=false --config "
                          "recipes/configs/guided_rl_qwen3_8b.yaml (or your own YAML)")
    if cfg.rl_seed < -1 or (cfg.rl_seed != -1 and not cfg.demo):
        raise ConfigError(f"rl_seed={cfg.rl_seed}: rl_seed reseeds the demo's RL stages (>= 0; -1 = seed); "
                         "with demo=false set seed= instead")
    unused = [f"{k}={getattr(cfg, k)}" for k in DEMO_ONLY if not cfg.demo and getattr(cfg, k) != CONFIG_DEFAULTS[k]]
    if unused:  # a demo=false run is Stage 2 alone: it would leave them unread
        raise ConfigError(f"{', '.join(unused)}: only the demo (demo=true) reads {'/'.join(DEMO_ONLY)}; a demo=false "
                          "run is Stage 2 alone (run Stage 3 with recipes/exploratory_rl.py, the table with "
                          "recipes/evaluate.py)")
    from minitagpr.data.demo_world import DEFAULTS as WORLD_DEFAULTS  # the demo world always has its defaults
    if cfg.demo and cfg.prompt_style not in ("", WORLD_DEFAULTS["prompt_style"]):
        raise ConfigError(f"prompt_style={cfg.prompt_style}: the demo's policy is SFT-trained on the demo world's "
                          f"{WORLD_DEFAULTS['prompt_style']!r} prompts, which its RL stages and table use; leave "
                          "prompt_style unset")
    info = D.init_distributed()
    if cfg.demo and (cfg.k, cfg.retriever) != (WORLD_DEFAULTS["k"], "recency"):  # an experiment, not an error
        D.log(f"[demo] note: SFT's chains and PRMU's pairs show the demo world's k={WORLD_DEFAULTS['k']} most recent "
              f"profile items; this run's RL stages and table use k={cfg.k}, retriever={cfg.retriever}")
    report = None
    try:
        if not cfg.demo:
            if not (cfg.policy and cfg.data_root and (cfg.prmu or not cfg.use_prmu or cfg.gamma == 0)):
                raise ConfigError("demo=false needs policy=, data_root= and prmu= (or use_prmu=false)")
            train(replace(cfg, out_dir=cfg.out_dir or "runs/guided_rl"))
            return
        work = Path(cfg.workdir)
        root = Path(cfg.out_dir) if cfg.out_dir else work  # this run's RL stages and table
        dirs = stage_dirs(work, root)
        old = stages.unstamped(dirs.values())
        if old:  # all named at once, before anything trains
            raise ConfigError(f"{', '.join(map(str, old))}: built without a {stages.STAMP} (an older minitagpr, a "
                              "stage run by hand, or its stamp deleted), so what they were built from is unknown; "
                              f"delete those stage folders (or all of {work}) to rebuild them, or give this run a new "
                              "workdir=")
        # 1-3. earlier stages, built once
        paths = demo_stages(cfg, dirs)
        guided_cfg = replace(cfg, policy=str(paths["sft"]), prmu=str(paths["prmu"] or ""),
                             data_root=str(work / "world"),
                             prompt_style=paths["world"].params["prompt_style"],  # the style SFT trained on
                             out_dir=str(dirs["guided"][0]), seed=cfg.seed if cfg.rl_seed < 0 else cfg.rl_seed)
        hint = ("; or keep it and put this run's RL stages and table elsewhere with out_dir=DIR; or redo the RL "
                "stages here with rerun=true")
        # 4. guided RL (Stage 2); a PRMU it does not read (use_prmu=false, gamma=0) was not built: not an input
        guided_export, guided_build = build_or_reuse(
            "4. guided RL (GSPO, composite reward)", dirs["guided"], guided_cfg, RL_PLUMBING, paths["builds"], train,
            rerun=cfg.rerun, rerun_hint=hint)
        # 5. exploratory RL (Stage 3): foundation reward from the guided checkpoint
        explore_cfg = replace(guided_cfg, stage="exploratory", policy=str(guided_export), prmu="", use_prmu=False,
                              use_tag_reward=False, out_dir=str(dirs["exploratory"][0]),
                              max_steps=cfg.exploratory_steps)  # save_every as Stage 2: a kill resumes
        explore_export, _ = build_or_reuse(
            "5. exploratory RL (GSPO, foundation reward)", dirs["exploratory"], explore_cfg,
            RL_PLUMBING - {"exploratory_steps"} | {"max_steps"},  # the key the user sets, named
            {"world": paths["builds"]["world"], "guided": guided_build}, train,
            rerun=cfg.rerun, rerun_hint=hint)
        # 6. evaluation table on the demo world's dev split
        D.log("[demo] 6. evaluation: base vs SFT vs guided vs exploratory on the demo dev sets")
        table = evaluate_table({"Base": paths["base"], "SFT": paths["sft"], "Guided RL": guided_export,
                                "Exploratory RL": explore_export}, paths["world"], replace(guided_cfg, seed=cfg.seed),
                               root / "eval")  # the evaluation's seed is the run's, whatever rl_seed
        report = (guided_cfg, paths, root, table)
    finally:
        D.destroy_distributed()
    if report is not None and info.is_main:  # no collectives in it: a failure there leaves no rank waiting
        print_demo_report(cfg, *report)


if __name__ == "__main__":
    with exit_on_user_error("guided_rl"):
        main(sys.argv[1:])
    D.end_process()  # skip interpreter finalization (see there)
