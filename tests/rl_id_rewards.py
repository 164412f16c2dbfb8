"""recipes/exploratory_rl.py with rewards that depend on the sampled ids, for tests/test_rl_loop.py.

A random policy earns reward 0 everywhere, so every group has zero variance and a step trains nothing. Here each
response's reward is (sum of its token ids mod 7) / 7: groups have variance, the update moves the weights, and a
1-process and a 2-process run of the same step can be compared on rewards, advantages, loss and weights.
    python -m torch.distributed.run --nproc_per_node=2 tests/rl_id_rewards.py key=value ...   (or plain python)"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import exploratory_rl  # noqa: E402  (the recipe, from its folder)

from minitagpr import distributed as D  # noqa: E402
from minitagpr.cli import exit_on_user_error  # noqa: E402
from minitagpr.rl import loop  # noqa: E402

_real_rewards = loop.compute_rewards


def id_rewards(prompts, completions, cfg, prmu=None):
    parts, _ = _real_rewards(prompts, completions, cfg, prmu)
    return parts, torch.tensor([sum(c.token_ids) % 7 / 7 for c in completions], dtype=torch.float64)


if __name__ == "__main__":
    loop.compute_rewards = id_rewards
    with exit_on_user_error("rl_id_rewards"):
        exploratory_rl.main(sys.argv[1:])
    D.end_process()
