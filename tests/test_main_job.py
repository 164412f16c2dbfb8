"""The main job end to end, with no fakes: `torchrun --nproc_per_node=2 recipes/guided_rl.py` builds the demo world,
SFT, PRMU, guided and exploratory RL and the table, each stage shrunk to a few steps (sft_settings=,
prmu_settings= and the RL keys; about 20 s). tests/test_demo_stages.py checks the stage rules with fake stages;
this checks that the real stages are wired to each other: each reads the export and settings it should, the
report prints, a second run reuses every stage and prints the same table, and the commands a researcher runs next
(configs/eval_demo.yaml's re-scoring, Stage 3 by hand) take the job's exports."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from train_fixtures import REPO, launch_recipe

MICRO = ["sft_settings=max_steps=4 eval_holdout=2 eval_max_new_tokens=32",
         "prmu_settings=max_steps=4 demo_pairs_per_set=40 save_every=0",
         "max_steps=2", "exploratory_steps=1", "prompts_per_step=4", "eval_examples=2", "save_every=0",
         "max_new_tokens=48"]
TASKS = ["LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"]
MODEL_ROWS = ["Base", "SFT", "Guided RL", "Exploratory RL"]


CPU = {"CUDA_VISIBLE_DEVICES": ""}  # the CPU path on any machine: two ranks, fp32, token-identical decoding


def run_main_job(work: Path, *extra: str):
    return launch_recipe("guided_rl", [f"workdir={work}", *MICRO, *extra], nproc=2, env=CPU, timeout=300)


def ok(proc) -> str:
    assert proc.returncode == 0, f"main job failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def stamp(folder: Path) -> dict:
    return json.loads((folder / "stage.json").read_text())


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    work = tmp_path_factory.mktemp("main_job")
    out = ok(run_main_job(work))
    return work, out, (work / "eval" / "table.md").read_text()


def test_every_stage_is_built_once_in_order_from_the_one_before(first):
    work, out, _ = first
    built = [line for line in out.splitlines() if line.startswith("[demo] ") and line.endswith(": not built yet")]
    assert [line.split()[1] for line in built] == ["2.", "3.", "4.", "5."]
    assert f"[demo] 1. demo world {work / 'world'}: built (fingerprint " in out
    sft, prmu, guided, explore = (stamp(work / d) for d in ("sft", "prmu", "guided_rl", "exploratory_rl"))
    assert all(s["complete"] for s in (sft, prmu, guided, explore))
    world = sft["upstream"]["world"]
    assert prmu["upstream"] == {"world": world, "sft": sft["build"]}
    assert guided["upstream"] == {"world": world, "sft": sft["build"], "prmu": prmu["build"]}
    assert explore["upstream"] == {"world": world, "guided": guided["build"]}
    # the user's settings reach SFT and PRMU; PRMU's others come from configs/prmu_demo.yaml, not PrmuConfig
    assert (sft["settings"]["max_steps"], sft["settings"]["eval_holdout"]) == (4, 2)
    assert (prmu["settings"]["max_steps"], prmu["settings"]["demo_pairs_per_set"]) == (4, 40)
    assert (prmu["settings"]["table_lr"], prmu["settings"]["heldout_frac"]) == (0.1, 0.3)
    assert prmu["settings"]["new_head"] is True
    # each stage starts from the export before it
    assert f"init: {work / 'sft' / 'hf'}" in (work / "prmu" / "config.yaml").read_text()
    g_cfg = (work / "guided_rl" / "config.yaml").read_text()
    e_cfg = (work / "exploratory_rl" / "config.yaml").read_text()
    assert f"policy: {work / 'sft' / 'hf'}" in g_cfg and f"prmu: {work / 'prmu' / 'hf'}" in g_cfg
    assert f"policy: {work / 'guided_rl' / 'export'}" in e_cfg and "stage: exploratory" in e_cfg
    assert [r["step"] for r in metrics(work / "sft") if "loss" in r] == [1, 2, 3, 4]  # completed steps, as RL
    for folder, steps in (("guided_rl", 2), ("exploratory_rl", 1)):
        rows = metrics(work / folder)
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert all(math.isfinite(r["gspo/loss"]) for r in rows)
        assert all(r["rollout/logp_gap_max"] < 1e-4 for r in rows)  # the fp32 sampler holds the policy's weights
    # guided RL scores with the length the PRMU was trained on (prmu_demo.yaml: 1024), and no demo input is cut
    assert "PRMU " + str(work / "prmu" / "hf") + ": inputs up to 1024 tokens" in out
    assert all(r["prmu_inputs_cut"] == 0 for r in metrics(work / "guided_rl"))


def test_the_report_prints_the_trends_the_table_and_rl_minus_sft(first):
    work, out, table_md = first
    for line in ("[demo] guided RL, first vs last 20% of steps:", "reward, balanced", "advantage vs term",
                 f"[demo] evaluation ({work / 'eval' / 'table.md'}):", "[demo] distinct answers among the 2 dev",
                 "[demo] dev generations that pass the format gate",
                 "95% interval from resampling the "):
        assert line in out
    assert re.search(r"resampling the (1 dev user|[2-9] dev users) \(2,000 draws\):", out)
    rows = [line for line in table_md.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 6 and "\n".join(rows) in out  # header, rule, 4 models, 2 rule rows
    table = json.loads((work / "eval" / "table.json").read_text())
    assert list(table["rows"]) == MODEL_ROWS + ["Rule: no profile", "Rule: profile"]
    assert all(sorted(table["rows"][row]) == TASKS for row in table["rows"])
    assert table["examples"] == {t: 2 for t in TASKS}
    for row in MODEL_ROWS:  # each decoded cell names the questions it read, cut to eval_examples
        assert sorted(table["sources"][row]) == TASKS
        assert all(s["limit"] == 2 and s["questions"].endswith("questions.json")
                   for s in table["sources"][row].values())
    diffs = json.loads((work / "eval" / "rl_vs_sft.json").read_text())
    assert sorted(diffs) == TASKS and all(len(d["Guided RL"]) == 3 for d in diffs.values())
    for task in TASKS:
        assert sum(line.startswith(f"  {task} ") for line in out.splitlines()) == 1  # its RL - SFT line


def test_a_second_run_reuses_every_stage_and_prints_the_same_table(first):
    work, _, table_md = first
    before = {d: stamp(work / d)["build"] for d in ("sft", "prmu", "guided_rl", "exploratory_rl")}
    out = ok(run_main_job(work))
    assert sum(": reusing " in line for line in out.splitlines()) == 4 and "not built yet" not in out
    assert f"[demo] 1. demo world {work / 'world'}: reused (fingerprint " in out
    assert {d: stamp(work / d)["build"] for d in before} == before
    assert (work / "eval" / "table.md").read_text() == table_md  # greedy decoding of the same exports


def test_another_prmu_setting_is_refused_by_name_and_the_stage_is_kept(first):
    work, _, _ = first
    before = stamp(work / "prmu")
    proc = run_main_job(work, "prmu_settings=max_steps=5 demo_pairs_per_set=40 save_every=0")
    assert proc.returncode != 0
    assert f"{work / 'prmu'} was built with other settings than this run's: max_steps 4 -> 5" in proc.stderr
    assert f"[guided_rl] error (rank 0): {work / 'prmu'} was built" in proc.stderr
    for ours in (REPO / "recipes", REPO / "minitagpr"):  # torchrun's own traceback follows; none from our code
        assert f'File "{ours}' not in proc.stderr
    assert stamp(work / "prmu") == before and (work / "prmu" / "hf").is_dir()


def test_eval_demo_yaml_rescores_the_main_jobs_checkpoints_to_the_same_rows(first):
    """configs/eval_demo.yaml says it prints the main job's table: one process decoding every checkpoint gives the
    rows the main job's two ranks gave (each decoding half of the checkpoints)."""
    work, _, table_md = first
    exports = {"Base": work / "base_demo", "SFT": work / "sft" / "hf", "Guided RL": work / "guided_rl" / "export",
               "Exploratory RL": work / "exploratory_rl" / "export"}
    out = work / "eval_config"
    proc = launch_recipe("evaluate", ["--config", str(REPO / "recipes" / "configs" / "eval_demo.yaml"),
                                      f"data_dir={work / 'world'}", f"out_dir={out}", "limit=2", "max_new_tokens=48",
                                      "checkpoints=" + ",".join(f"{n}={p}" for n, p in exports.items())], nproc=1,
                          env=CPU)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = (out / "table.md").read_text()
    model_rows = [line for line in table_md.splitlines() if line.startswith(tuple(f"| {n} |" for n in exports))]
    assert len(model_rows) == 4 and all(row in again.splitlines() for row in model_rows)
    for name in exports:  # and token for token the same generations
        folder = name.replace(" ", "_")
        for task in TASKS:
            texts = [[json.loads(line)["text"] for line in (root / "generations" / folder / f"{task}.jsonl")
                      .read_text().splitlines()] for root in (work / "eval", out)]
            assert texts[0] == texts[1] and len(texts[0]) == 2, (name, task)


def test_the_standalone_exploratory_recipe_continues_from_the_guided_export(first):
    """Stage 3 run by hand, as recipes/exploratory_rl.py's docstring shows, from the main job's guided export."""
    work, _, _ = first
    out = work / "explore_by_hand"
    proc = launch_recipe("exploratory_rl", [f"policy={work / 'guided_rl' / 'export'}", f"data_root={work / 'world'}",
                                            "prompt_style=brief", "tasks=LaMP-1:4,LaMP-4:4", "max_steps=1",
                                            "prompts_per_step=4", "max_new_tokens=32", f"out_dir={out}",
                                            "save_every=0"], nproc=1, env=CPU)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = metrics(out)
    assert row["step"] == 1 and math.isfinite(row["gspo/loss"]) and "r_prmu_mean" not in row
    assert (out / "export" / "config.json").is_file()
