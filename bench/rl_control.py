"""A control for the demo's RL rows: both RL stages with each group's rewards shuffled among its G responses.

The shuffle keeps every group's rewards (so the advantages have the same sizes, the same zero-variance groups and
the same logged reward curves) but ties them to the wrong responses: the update is as large as a real one and
carries no information about which response was better. How far the table's RL cells move under this control is
how far an update of that size moves them without learning; compare with bench/rl_seeds.py's real runs.

    torchrun --nproc_per_node=2 bench/rl_control.py rl_seed=S out_dir=runs/rl_control/seedS [key=value ...]

Arguments are recipes/guided_rl.py's (the demo: world, SFT and PRMU of `workdir` reused; give a new `out_dir`).
Its RL stages are stamped with `reward_control: shuffled` among their settings, so a normal run refuses to reuse
them (and this control refuses a normal run's). A benchmark that reports, not a test.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import guided_rl  # noqa: E402  (recipes/ is a folder of scripts)

from minitagpr import distributed as D  # noqa: E402
from minitagpr import stages  # noqa: E402
from minitagpr.cli import exit_on_user_error  # noqa: E402
from minitagpr.rl import loop  # noqa: E402

CONTROL = {"reward_control": "shuffled"}


def shuffled_rewards(real):
    """loop.compute_rewards with each group's rewards permuted among its G responses. The permutations are seeded by
    the stage seed and this rank's share of the batch (its prompt ids and sampled texts), so a rerun or a resumed
    stage on the same number of ranks draws the same ones (another number of ranks splits the batch otherwise and
    draws others). The loop logs aggregates of the rewards it is handed (means, group statistics), which a
    permutation within each group leaves as they were: the logs stay real. A batch with a non-finite reward is
    passed on unshuffled, so loop.check_finite names the right response."""
    def compute(prompts, completions, cfg, prmu=None):
        parts, rewards = real(prompts, completions, cfg, prmu)
        if not torch.isfinite(rewards).all():
            return parts, rewards
        key = "\x1f".join([str(loop.stage_seed(cfg)), *(p.id for p in prompts), *(c.text for c in completions)])
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        groups = rewards.view(-1, cfg.group_size)
        perm = torch.stack([torch.randperm(cfg.group_size, generator=gen) for _ in range(groups.shape[0])])  # (B, G)
        return parts, torch.gather(groups, 1, perm).reshape(-1)
    return compute


def stamped(real):
    """stages.settings with CONTROL added for the RL stages, so their stamps differ from a normal run's."""
    def settings(cfg, ignore):
        out = real(cfg, ignore)
        return {**out, **CONTROL} if isinstance(cfg, loop.RLConfig) else out
    return settings


def main(argv: list[str]) -> None:
    if not any(a.startswith("out_dir=") for a in argv):
        raise SystemExit("bench/rl_control.py: give out_dir=DIR (its RL stages must not land in the main run's folder)")
    loop.compute_rewards = shuffled_rewards(loop.compute_rewards)
    stages.settings = stamped(stages.settings)
    guided_rl.main(argv)


if __name__ == "__main__":
    with exit_on_user_error("rl_control"):
        main(sys.argv[1:])
    D.end_process()
