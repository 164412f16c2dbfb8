"""bench/rl_control.py: the shuffled-reward control must keep each group's rewards and stamp its stages apart."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from minitagpr import stages
from minitagpr.config import ConfigError
from minitagpr.rl import loop

BENCH = Path(__file__).resolve().parents[1] / "bench" / "rl_control.py"


@pytest.fixture(scope="module")
def control():
    spec = importlib.util.spec_from_file_location("bench_rl_control", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_rl_control"] = module
    spec.loader.exec_module(module)
    return module


def test_each_group_keeps_its_rewards_in_another_order(control):
    B, G = 40, 5
    real = torch.arange(B * G, dtype=torch.float64)

    def fake(prompts, completions, cfg, prmu=None):
        return "parts", real.clone()
    cfg = loop.RLConfig(group_size=G, seed=3)
    compute = control.shuffled_rewards(fake)
    parts, got = compute(None, None, cfg)
    assert parts == "parts" and got.dtype == torch.float64 and got.shape == (B * G,)
    for g in range(B):  # the same five values, each still in its own group
        assert sorted(got[g * G:(g + 1) * G].tolist()) == real[g * G:(g + 1) * G].tolist()
    assert (got != real).sum() > B  # most groups reordered
    again = control.shuffled_rewards(fake)(None, None, cfg)[1]
    assert torch.equal(got, again)  # seeded: a rerun trains on the same permutations
    assert not torch.equal(compute(None, None, cfg)[1], got)  # the next call draws new ones


def test_its_rl_stamps_differ_from_a_normal_runs(control, tmp_path):
    settings = control.stamped(stages.settings)
    rl = loop.RLConfig()
    assert settings(rl, set())["reward_control"] == "shuffled"
    assert "reward_control" not in stages.settings(rl, set())
    folder, export = tmp_path / "guided_rl", tmp_path / "guided_rl" / "export"
    normal = stages.settings(rl, set())
    plan = stages.plan(folder, export, normal, {})
    stages.begin(folder, export, plan, "guided", normal, {})
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    stages.finish(folder)
    with pytest.raises(ConfigError, match="reward_control"):  # the control does not reuse a normal run
        stages.plan(folder, export, settings(rl, set()), {})
    assert stages.plan(folder, export, normal, {}).reuse


def test_it_refuses_to_run_without_its_own_out_dir(control):
    with pytest.raises(SystemExit, match="out_dir"):
        control.main(["rl_seed=1"])
