"""One GSPO update on a fixed synthetic rollout batch, under torchrun (1 or 2 processes); writes loss + weights.

Used by tests/test_rl_loop.py: the same global batch must give the same update whatever the number of ranks.
    python -m torch.distributed.run --nproc_per_node=N tests/rl_step_worker.py CKPT OUT ['{"token_level": true}']
The optional third argument overrides RLConfig keys (JSON), so a new loss variant gets this test by passing its key."""
import json
import sys

import torch

from minitagpr import distributed as D
from minitagpr.rl.loop import RLConfig, gspo_update, micro_batch_plan, reduce_train_metrics, sequence_logprobs
from minitagpr.train.optim import build_optimizer


def synthetic_batch(num_prompts: int, G: int, vocab: int, seed: int = 0):
    """Prompt-major rows of ragged prompt + response lengths, with fixed advantages; identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    N, T = num_prompts * G, 24
    input_ids = torch.randint(0, vocab, (N, T), generator=g)
    targets = torch.full((N, T), -100, dtype=torch.long)
    for n in range(N):
        p = int(torch.randint(3, 9, (1,), generator=g))
        r = 0 if n % 7 == 3 else int(torch.randint(1, T - p, (1,), generator=g))  # one empty response in seven
        targets[n, p:p + r] = torch.randint(0, vocab, (r,), generator=g)
    adv = torch.randn(N, generator=g)
    return input_ids, targets, targets != -100, adv


def main(ckpt: str, out: str, overrides: dict | None = None):
    info = D.init_distributed()
    cfg = RLConfig(**{**dict(group_size=4, num_minibatches=2, ppo_epochs=2, micro_batch_size=3, lr=1e-3,
                             grad_clip=1.0, eps_low=0.2, eps_high=0.2, prompts_per_step=4), **(overrides or {})})
    model = D.build_sharded_causal_lm(ckpt, info, D.device_mesh(info))
    optimizer = build_optimizer(model, cfg.lr)
    input_ids, targets, mask, adv = synthetic_batch(num_prompts=4, G=cfg.group_size, vocab=512)
    per = len(input_ids) // info.world_size  # whole groups per rank (prompt-major rows)
    sl = slice(info.rank * per, (info.rank + 1) * per)
    rows = [r for chunks in micro_batch_plan(mask[sl], per // cfg.group_size, cfg) for r in chunks]
    old = sequence_logprobs(model, input_ids[sl], targets[sl], rows)
    noise = 0.01 * torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(1))  # (N, T), global
    old = old + noise[sl] * mask[sl]  # pi_old != pi_theta, so ratios move and clipping can act
    batch = {"input_ids": input_ids[sl], "targets": targets[sl], "mask": mask[sl], "old_logp": old,
             "advantages": adv[sl]}
    metrics = reduce_train_metrics(gspo_update(model, optimizer, batch, cfg, info.device), info.device)
    full = D.full_state_dict(model)
    if info.is_main:
        torch.save({"metrics": metrics, "weights": full}, out)
    D.barrier()
    D.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
    D.end_process()  # as the recipes do: skip interpreter finalization (minitagpr.distributed.end_process)
