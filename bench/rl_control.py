"""A control for the demo's RL rows: both RL stages with each group's rewards shuffled among its G responses.

The shuffle keeps every group's rewards (so the advantages have the same sizes, the same zero-variance groups and
the same logged reward curves) but ties them to the wrong responses: the update is as large as a real one and
carries no information about which response was better. How far the table's RL cells move under this control is
how far an update of that size moves them without learning; compare with bench/rl_seeds.py's real runs.

    torchrun --nproc_per_node=2 bench/rl_control.py rl_seed=S out_dir=runs/rl_control/seedS [key=value ...]

Arguments are recipes/guided_rl.py's (the demo: world, SFT and PRMU of `workdir` reused; give a new `out_dir`).
Its RL stages are stamped with `reward_control` (CONTROL) among their settings, so a normal run refuses to reuse
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

# A new way of shuffling gets a new value, so that the stages of the old one are refused rather than reused.
CONTROL = {"reward_control": "shuffled in each group, seeded by the group"}


def group_permutation(seed: int, prompt_id: str, texts: list[str]) -> torch.Tensor:
    """The order one group's rewards are shuffled into, drawn from the group alone (stage seed, prompt id, its G
    sampled texts): the same group gets the same permutation in a rerun, a resumed stage or on another number of
    ranks, and another group (or the same prompt sampled again) gets its own."""
    key = "\x1f".join([str(seed), prompt_id, *texts])
    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    return torch.randperm(len(texts), generator=gen)


def shuffled_rewards(real):
    """loop.compute_rewards with each group's rewards permuted among its G responses (group_permutation). The loop
    logs aggregates of the rewards it is handed (means, group statistics), which a permutation within each group
    leaves as they were: the logs stay real, except group/adv_corr/<term>, which shows the advantages no longer
    following the terms they were computed from (the point of the control). A batch with a non-finite reward is
    passed on unshuffled, so loop.check_finite names the right response."""
    def compute(prompts, completions, cfg, prmu=None):
        parts, rewards = real(prompts, completions, cfg, prmu)
        if not torch.isfinite(rewards).all():
            return parts, rewards
        G, seed = cfg.group_size, loop.stage_seed(cfg)
        groups = rewards.view(-1, G)
        perm = torch.stack([group_permutation(seed, p.id, [c.text for c in completions[i * G:(i + 1) * G]])
                            for i, p in enumerate(prompts)])  # (B, G)
        return parts, torch.gather(groups, 1, perm).reshape(-1)
    return compute


def stamped(real):
    """stages.settings with CONTROL added for the RL stages, so their stamps differ from a normal run's."""
    def settings(cfg, ignore):
        out = real(cfg, ignore)
        return {**out, **CONTROL} if isinstance(cfg, loop.RLConfig) else out
    return settings


def main(argv: list[str]) -> None:
    if not any(a.startswith("out_dir=") or a in ("-h", "--help") for a in argv):  # --help: guided_rl's keys
        raise SystemExit("bench/rl_control.py: give out_dir=DIR (its RL stages must not land in the main run's folder)")
    loop.compute_rewards = shuffled_rewards(loop.compute_rewards)
    stages.settings = stamped(stages.settings)
    guided_rl.main(argv)


if __name__ == "__main__":
    with exit_on_user_error("rl_control"):
        main(sys.argv[1:])
    D.end_process()
