"""Stage 3 -- exploratory RL: GSPO from the guided-RL checkpoint with the foundation reward only,
R_foundation = (R_v + R_rep) * R_f (no tag reward, no PRMU); 2 epochs, otherwise as Stage 2 (tagpr-method.md).

    torchrun --nproc_per_node=8 recipes/exploratory_rl.py --config recipes/configs/exploratory_rl_qwen3_8b.yaml
    torchrun --nproc_per_node=2 recipes/exploratory_rl.py policy=runs/demo/guided_rl/export data_root=runs/demo/world \
        prompt_style=brief ...        (the demo runs this stage from recipes/guided_rl.py)

The loop itself (rollout -> rewards -> advantages -> old log-probs -> GSPO mini-batches -> weight sync) is
minitagpr/rl/loop.py, shared with recipes/guided_rl.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields

from minitagpr import distributed as D
from minitagpr.cli import exit_on_user_error
from minitagpr.config import ConfigError, parse_cli
from minitagpr.rl.loop import RLConfig, train


@dataclass
class ExploratoryConfig(RLConfig):
    stage: str = "exploratory"  # the only stage this recipe runs: the foundation reward R = (R_v + R_rep)R_f
    out_dir: str = "runs/exploratory_rl"
    epochs: float = 2.0  # passes over the task mix's prompts (the paper's Stage 3: 2)
    use_tag_reward: bool = False  # unused: the foundation reward has no tag term; false so config.yaml says so
    use_prmu: bool = False  # unused: the foundation reward has no PRMU term (no PRMU is loaded); false, as above


# Keys of Stage 2's composite reward: the foundation reward reads none of them, so a value other than the default
# would be silently unused
GUIDED_ONLY = ("prmu", "alpha", "beta", "gamma", "use_tag_reward", "use_prmu", "prmu_user_table", "prmu_max_len")


def main(argv: list[str]) -> None:
    cfg = parse_cli(ExploratoryConfig, argv)
    if cfg.stage != "exploratory":
        raise ConfigError("recipes/exploratory_rl.py runs stage=exploratory; use recipes/guided_rl.py for Stage 2")
    defaults = {f.name: f.default for f in fields(ExploratoryConfig)}
    unused = [f"{k}={getattr(cfg, k)}" for k in GUIDED_ONLY if getattr(cfg, k) != defaults[k]]
    if unused:
        raise ConfigError(f"{', '.join(unused)}: Stage 3's foundation reward (R_v + R_rep)R_f has no tag or PRMU term "
                          "and no weights; these keys belong to recipes/guided_rl.py")
    if not cfg.policy:
        raise ConfigError("policy=<guided-RL export folder> is required (Stage 3 starts from the Stage 2 checkpoint)")
    D.init_distributed()
    try:
        train(cfg)
    finally:
        D.destroy_distributed()


if __name__ == "__main__":
    with exit_on_user_error("exploratory_rl"):
        main(sys.argv[1:])
    D.end_process()  # skip interpreter finalization (see there)
