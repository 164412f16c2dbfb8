"""The YAML files in recipes/configs parse into their recipe's dataclass (typos in keys fail here, not on a cluster)."""
import importlib
import sys
from pathlib import Path

import pytest

from minitagpr.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))


@pytest.mark.parametrize("yaml_name, module, cls", [
    ("guided_rl_qwen3_8b.yaml", "guided_rl", "GuidedConfig"),
    ("guided_rl_demo.yaml", "guided_rl", "GuidedConfig"),
    ("exploratory_rl_qwen3_8b.yaml", "exploratory_rl", "ExploratoryConfig"),
])
def test_rl_configs_load(yaml_name, module, cls):
    cfg = load_config(getattr(importlib.import_module(module), cls), RECIPES / "configs" / yaml_name)
    assert cfg.group_size == 5 and cfg.eps_low == 3e-4 and cfg.eps_high == 4e-4


def test_demo_yaml_equals_the_embedded_default():
    guided_rl = importlib.import_module("guided_rl")
    assert load_config(guided_rl.GuidedConfig, RECIPES / "configs" / "guided_rl_demo.yaml") == guided_rl.GuidedConfig()


def test_paper_settings_in_the_8b_configs():
    guided_rl = importlib.import_module("guided_rl")
    cfg = load_config(guided_rl.GuidedConfig, RECIPES / "configs" / "guided_rl_qwen3_8b.yaml")
    assert (cfg.prompts_per_step, cfg.lr, cfg.epochs, cfg.temperature, cfg.top_p) == (128, 1e-6, 13, 1.0, 1.0)
    assert (cfg.alpha, cfg.beta, cfg.gamma) == (0.8, 0.8, 0.2) and not cfg.demo
    assert cfg.tasks == "LaMP-1:1024,LaMP-2:3200,LaMP-3:1024,LaMP-4:1024,LaMP-5:1024,LaMP-7:1024"
    explore = importlib.import_module("exploratory_rl")
    e = load_config(explore.ExploratoryConfig, RECIPES / "configs" / "exploratory_rl_qwen3_8b.yaml")
    assert e.stage == "exploratory" and e.epochs == 2 and not e.use_prmu and not e.use_tag_reward


def test_sft_and_prmu_paper_configs_load_with_the_papers_sft_settings():
    sft = load_config(importlib.import_module("sft").SftConfig, RECIPES / "configs" / "sft_qwen3_8b.yaml")
    assert (sft.lr, sft.global_batch, sft.epochs) == (1e-5, 64, 2)  # tagpr-method.md, SFT
    prmu = load_config(importlib.import_module("train_prmu").PrmuConfig, RECIPES / "configs" / "prmu_qwen3_0.6b.yaml")
    assert prmu.init == "Skywork/Skywork-Reward-V2-Qwen3-0.6B" and prmu.use_user_table


def test_stage_3_runs_otherwise_as_stage_2():
    """tagpr-method.md: Stage 3 is Stage 2 with the foundation reward and 2 epochs, "otherwise as Stage 2": every
    RL setting of the two paper configs agrees except the stage's own (where it writes, which reward terms)."""
    from dataclasses import fields

    from minitagpr.rl.loop import RLConfig
    guided = load_config(importlib.import_module("guided_rl").GuidedConfig,
                         RECIPES / "configs" / "guided_rl_qwen3_8b.yaml")
    explore = load_config(importlib.import_module("exploratory_rl").ExploratoryConfig,
                          RECIPES / "configs" / "exploratory_rl_qwen3_8b.yaml")
    differ = {f.name for f in fields(RLConfig) if getattr(guided, f.name) != getattr(explore, f.name)}
    assert differ == {"stage", "out_dir", "epochs", "use_tag_reward", "use_prmu"}


def test_stage_3_without_a_config_file_trains_as_the_paper_config_does():
    """exploratory_rl.py runs without --config (its defaults are RLConfig's): only where and on what hardware it runs
    may differ from the 8B YAML, never a setting of the method (prompt and response budgets included: a response
    cut earlier than Stage 2 cut it gets R_f = 0)."""
    from dataclasses import fields

    from minitagpr.rl.loop import RLConfig
    cls = importlib.import_module("exploratory_rl").ExploratoryConfig
    paper = load_config(cls, RECIPES / "configs" / "exploratory_rl_qwen3_8b.yaml")
    differ = {f.name for f in fields(RLConfig) if getattr(cls(), f.name) != getattr(paper, f.name)}
    assert differ <= {"out_dir", "engine", "vllm_gpu_memory_utilization", "micro_batch_size",
                      "activation_checkpointing"}, differ


@pytest.mark.parametrize("arg", ["gamma=0.5", "prmu=/some/rm", "use_tag_reward=true", "alpha=1"])
def test_stage_3_refuses_the_keys_of_stage_2s_composite_reward(arg):
    from minitagpr.config import ConfigError
    with pytest.raises(ConfigError, match=rf"{arg.split('=')[0]}=.*: Stage 3's foundation reward"):
        importlib.import_module("exploratory_rl").main([arg, "policy=/unused"])


def test_demo_trend_windows_and_the_task_balanced_reward(tmp_path):
    """The demo's "did it learn" printout: window means skip steps that did not log a key, and the balanced reward
    weighs tasks equally, so a late window that merely sampled an easier task does not look like learning."""
    import json
    guided_rl = importlib.import_module("guided_rl")
    rows = [  # task A is easy (reward ~0.6), task B hard (~0.0); neither improves, but the last step samples only A
        {"reward_mean": 0.3, "reward_mean/A": 0.6, "reward_mean/B": 0.0},
        {"reward_mean": 0.3, "reward_mean/A": 0.6, "reward_mean/B": 0.0},
        {"reward_mean": 0.3, "reward_mean/A": 0.6, "reward_mean/B": 0.0},
        {"reward_mean": 0.3, "reward_mean/A": 0.6, "reward_mean/B": 0.0},
        {"reward_mean": 0.6, "reward_mean/A": 0.6},
    ]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trend = guided_rl.first_last_share(log, ["reward_mean", "reward_mean/A", "reward_mean/B"], share=0.2)
    assert trend["reward_mean"] == (0.3, 0.6)  # the plain mean "rises" ...
    assert trend["reward_mean/A"] == (0.6, 0.6)
    b_first, b_last = trend["reward_mean/B"]
    assert b_first == 0.0 and b_last != b_last  # B not sampled in the last window: NaN, not 0
    assert guided_rl.balanced_reward_trend(trend, ["A", "B"]) == (0.6, 0.6)  # ... the balanced one does not
    import math
    assert all(math.isnan(x) for x in guided_rl.balanced_reward_trend({}, ["A"]))  # nothing logged: NaN, not 0


def test_demo_trend_weighs_a_tasks_steps_by_its_responses(tmp_path):
    """A step that sampled one prompt of a task counted as much as one that sampled seven: the window mean of a
    per-task key is over the task's responses (responses/<task>), as the whole-batch keys are; a window with a step
    logged before the count existed weighs its steps alike; other keys with a '/' are never weighted."""
    import json
    guided_rl = importlib.import_module("guided_rl")
    rows = [{"r_v_mean/A": 1.0, "responses/A": 5, "gspo/x": 1.0},
            {"r_v_mean/A": 0.0, "responses/A": 35, "gspo/x": 0.0},
            {"r_v_mean/A": 0.8, "responses/A": 30, "gspo/x": 0.0}, {"r_v_mean/A": 0.2}]  # the last: no count
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trend = guided_rl.first_last_share(log, ["r_v_mean/A", "gspo/x"], share=0.5)
    assert trend["r_v_mean/A"] == pytest.approx((5 / 40, 0.5))  # weighted; the mixed last window: alike
    assert trend["gspo/x"] == pytest.approx((0.5, 0.0))


@pytest.mark.parametrize("recipe, name", [("guided_rl.py", "guided_rl"), ("exploratory_rl.py", "exploratory_rl")])
def test_rl_recipes_report_bad_arguments_in_one_line(recipe, name):
    """A typo on the command line ends with one line naming the key (and the closest valid one), exit status 1."""
    import subprocess
    res = subprocess.run([sys.executable, str(RECIPES / recipe), "max_stepz=3"], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "WORLD_SIZE": "1"})
    assert res.returncode == 1
    assert res.stderr.startswith(f"[{name}] error: ") and "max_stepz" in res.stderr and "max_steps" in res.stderr
    assert "Traceback" not in res.stderr


def test_user_errors_name_the_rank_under_torchrun(monkeypatch, capsys):
    from minitagpr.cli import exit_on_user_error
    from minitagpr.config import ConfigError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        with exit_on_user_error("demo"):
            raise ConfigError("config key 'lr' (from command line): expected a float, got 'fast'")
    assert exit_info.value.code == 1
    expected = "[demo] error (rank 1): config key 'lr' (from command line): expected a float, got 'fast'\n"
    assert capsys.readouterr().err == expected
    with pytest.raises(KeyError):  # a bug is not a user error: it keeps its traceback
        with exit_on_user_error("demo"):
            raise KeyError("x")


def test_rl_vs_sft_reads_the_written_predictions_and_resamples_users(tmp_path):
    """The demo's RL-minus-SFT lines: per task, from the official-format prediction files the table wrote, one
    (difference, low, high) per RL row, the users counted from the questions, and rl_vs_sft.json written."""
    import json
    from dataclasses import replace

    from minitagpr.data import lamp
    sys.path.insert(0, str(RECIPES.parent / "tests"))
    from lamp_fixtures import make_examples

    guided_rl = importlib.import_module("guided_rl")
    examples, golds = make_examples("LaMP-3", n=6, split="time")
    examples = [replace(ex, user_id=f"u{k % 3}") for k, ex in enumerate(examples)]  # 3 users x 2 questions
    q, o = tmp_path / "q.json", tmp_path / "o.json"
    lamp.write_questions(q, examples)
    lamp.write_outputs(o, "LaMP-3", golds)
    ids = [ex.id for ex in examples]
    guided_preds = {i: str(int(golds[i]) % 5 + 1) if k < 2 else golds[i] for k, i in enumerate(ids)}  # 2 misses
    rows = {"SFT": dict(golds), "Guided RL": guided_preds, "Exploratory RL": dict(golds)}
    for row, preds in rows.items():
        lamp.write_outputs(tmp_path / "eval" / "predictions" / row.replace(" ", "_") / "LaMP_3_predictions.json",
                           "LaMP-3", preds)
    out = guided_rl.rl_vs_sft({"LaMP-3": (q, o)}, ["LaMP-3"], tmp_path / "eval", 0, samples=500)
    d = out["LaMP-3"]
    assert (d["metric"], d["higher_is_better"], d["users"]) == ("mae", False, 3)
    errors = sum(abs(int(guided_preds[i]) - int(golds[i])) for i in ids)
    diff, low, high = d["Guided RL"]
    assert diff == pytest.approx(errors / 6) and low <= diff <= high
    assert d["Exploratory RL"] == (0.0, 0.0, 0.0)
    saved = json.loads((tmp_path / "eval" / "rl_vs_sft.json").read_text())
    assert saved["LaMP-3"]["Guided RL"] == list(d["Guided RL"])


def test_rl_vs_sft_scores_the_examples_the_table_scored(tmp_path):
    """With eval_examples = N the table decodes the first N dev examples only: the comparison must read those N
    (its users too), not the whole dev set (which would find no predictions for the rest)."""
    from dataclasses import replace

    from minitagpr.data import lamp
    sys.path.insert(0, str(RECIPES.parent / "tests"))
    from lamp_fixtures import make_examples

    guided_rl = importlib.import_module("guided_rl")
    examples, golds = make_examples("LaMP-3", n=6, split="time")
    examples = [replace(ex, user_id=f"u{k}") for k, ex in enumerate(examples)]  # one user per question
    q, o = tmp_path / "q.json", tmp_path / "o.json"
    lamp.write_questions(q, examples)
    lamp.write_outputs(o, "LaMP-3", golds)
    first = [ex.id for ex in examples[:4]]
    for row in ("SFT", "Guided RL", "Exploratory RL"):
        preds = {i: golds[i] if row == "SFT" else str(int(golds[i]) % 5 + 1) for i in first}
        lamp.write_outputs(tmp_path / "eval" / "predictions" / row.replace(" ", "_") / "LaMP_3_predictions.json",
                           "LaMP-3", preds)
    d = guided_rl.rl_vs_sft({"LaMP-3": (q, o)}, ["LaMP-3"], tmp_path / "eval", 4, samples=200)["LaMP-3"]
    assert d["users"] == 4
    assert d["Guided RL"][0] == pytest.approx(sum(abs(int(golds[i]) % 5 + 1 - int(golds[i])) for i in first) / 4)


def test_the_demo_table_gets_the_worlds_rules_as_reference_rows(tmp_path):
    """Without them a row that answers one label to every question read as a model that learnt something: the
    rule rows show what a constant, a query-only rule and the planted profile rule score on the same questions --
    the questions the table scored (eval_examples), with its retriever and k."""
    from minitagpr.data import demo_world
    from minitagpr.data.lamp import TASKS
    from minitagpr.metrics import evaluate as score

    guided_rl = importlib.import_module("guided_rl")
    evaluate = importlib.import_module("evaluate")
    world = demo_world.build(tmp_path / "world", seed=1, num_users=8, dev_users=3, per_user=3, vocab_size=1000)
    tasks = ["LaMP-1", "LaMP-3", "LaMP-7"]
    cfg = guided_rl.GuidedConfig(tasks=",".join(f"{t}:0" for t in tasks), eval_examples=5, k=2, retriever="bm25")
    table = evaluate.EvalTable()
    guided_rl.add_rule_rows(table, world, cfg)
    assert list(table.rows) == list(guided_rl.RULE_ROWS) and table.examples == {t: 5 for t in tasks}
    for task in tasks:
        golds = dict(list(world.golds(task, "dev").items())[:5])  # the first 5 questions, as the models
        aware, name, blind = demo_world.rule_predictions(world, task, "dev", 2, retriever="bm25", ids=list(golds))
        assert set(aware) == set(blind) == set(golds)
        assert table.rows["Rule: profile"][task] == score(task, aware, golds)
        assert table.rows["Rule: no profile"][task] == score(task, blind, golds)
        assert table.settings["Rule: no profile"]["per_task"][task] == name
        key = {"LaMP-1": "accuracy", "LaMP-3": "mae", "LaMP-7": "rouge1"}[task]
        best = table.rows["Rule: no profile"][task][key]
        for label in TASKS[task].labels:  # picked on the scored questions: no constant does better there
            value = score(task, {i: label for i in golds}, golds)[key]
            assert value >= best if key == "mae" else value <= best
    assert "| Rule: no profile |" in table.markdown() and "no model" in table.markdown()


def test_distinct_answers_count_each_rows_different_predictions(tmp_path):
    import json

    from minitagpr.data import lamp

    guided_rl = importlib.import_module("guided_rl")
    evaluate = importlib.import_module("evaluate")
    for row, preds in {"SFT": {"1": "[1]", "2": "[1]", "3": "[1]"}, "Guided RL": {"1": "[1]", "2": "[2]", "3": "[1]"}
                       }.items():
        lamp.write_outputs(evaluate.predictions_file(tmp_path, row, "LaMP-1"), "LaMP-1", preds)
    expected = {"SFT": {"LaMP-1": 1}, "Guided RL": {"LaMP-1": 2}}
    assert guided_rl.distinct_answers(tmp_path, ["SFT", "Guided RL"], ["LaMP-1"]) == expected
    assert json.loads((tmp_path / "distinct_answers.json").read_text()) == expected
