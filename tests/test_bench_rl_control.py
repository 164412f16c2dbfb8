"""bench/rl_control.py: the shuffled-reward control must keep each group's rewards and stamp its stages apart."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

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
    prompts = [SimpleNamespace(id=f"q{i}") for i in range(B)]
    completions = [SimpleNamespace(text=f"response {i}") for i in range(B * G)]

    def fake(prompts, completions, cfg, prmu=None):
        return "parts", real.clone()
    cfg = loop.RLConfig(group_size=G, seed=3)
    compute = control.shuffled_rewards(fake)
    parts, got = compute(prompts, completions, cfg)
    assert parts == "parts" and got.dtype == torch.float64 and got.shape == (B * G,)
    for g in range(B):  # the same five values, each still in its own group
        assert sorted(got[g * G:(g + 1) * G].tolist()) == real[g * G:(g + 1) * G].tolist()
    assert (got != real).sum() > B  # most groups reordered
    # seeded by the batch, not by a call count: a resumed stage or a fresh process draws the same permutations
    assert torch.equal(compute(prompts, completions, cfg)[1], got)
    assert torch.equal(control.shuffled_rewards(fake)(prompts, completions, cfg)[1], got)
    other = [SimpleNamespace(text=c.text + ".") for c in completions]
    assert not torch.equal(compute(prompts, other, cfg)[1], got)  # another batch, other permutations
    assert not torch.equal(compute(prompts, completions, loop.RLConfig(group_size=G, seed=4))[1], got)
    # each group draws from itself alone: the batch split over 2 or 3 ranks gets the same permutations
    def part(lo, hi):
        return control.shuffled_rewards(lambda *a, **k: (None, real[lo * G:hi * G].clone()))(
            prompts[lo:hi], completions[lo * G:hi * G], cfg)[1]
    for cuts in ((0, B // 2, B), (0, 7, B), (0, 13, 27, B)):
        assert torch.equal(torch.cat([part(lo, hi) for lo, hi in zip(cuts, cuts[1:])]), got)


def test_a_non_finite_reward_is_not_moved(control):
    real = torch.tensor([0.1, 0.2, float("nan"), 0.4, 0.5], dtype=torch.float64)
    _, got = control.shuffled_rewards(lambda *a, **k: (None, real.clone()))(
        [SimpleNamespace(id="q")], [SimpleNamespace(text=str(i)) for i in range(5)], loop.RLConfig(group_size=5))
    assert torch.isnan(got[2]) and torch.equal(got[[0, 1, 3, 4]], real[[0, 1, 3, 4]])  # check_finite names index 2


def test_its_rl_stamps_differ_from_a_normal_runs(control, tmp_path):
    settings = control.stamped(stages.settings)
    rl = loop.RLConfig()
    assert settings(rl, set())["reward_control"] == control.CONTROL["reward_control"]
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


def test_its_help_is_guided_rls(control, capsys, monkeypatch):
    """`--help` printed "give out_dir=DIR" and exited 1, while the docstring says its arguments are guided_rl.py's."""
    monkeypatch.setattr(loop, "compute_rewards", loop.compute_rewards)  # main() wraps both; undone after the test
    monkeypatch.setattr(stages, "settings", stages.settings)
    with pytest.raises(SystemExit) as stop:
        control.main(["--help"])
    assert stop.value.code in (0, None) and "GuidedConfig keys" in capsys.readouterr().out
