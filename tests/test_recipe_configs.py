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
