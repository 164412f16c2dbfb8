"""How many pair visits does a demo-size PRMU need before its user table carries a per-user preference?

A controlled probe of the soft-token mechanism of `minitagpr.model.reward.PRMU` (random "demo"-preset backbone,
user table, Bradley-Terry loss, AdamW with the table in its own group, warmup + cosine schedule, clipping), on
pairs where nothing but the user decides the winner:

    sequence = [task marker] + `--length` random filler tokens + [answer] + 2 end tokens
    user u's preferred answer in task t = fav[u][t] (one of 15 answer tokens of that task, drawn per user)
    training pair = (u, filler + fav[u][t]) over (u, same filler + another answer of task t)

Evaluation is *mirrored*: the rejected answer is another user's favourite for the same task, so a user-blind scorer
cannot just learn which answers are favourites. The rejected answer is drawn from the other users' favourites with
repeats, so a popular answer still wins a little more often than it loses: a scorer that ranks answers by popularity
gets 0.513-0.520 (seeds 0-2); read ~0.52 as chance. Only a model that reads the user's row scores clearly above it.
With --tasks T every user has T independent preferences (the demo world has six: LaMP-1 topic, LaMP-2 tag, LaMP-3
usual score, LaMP-4/5/7 styles and signature words).

    python bench/prmu_table_probe.py --tasks 1 --steps 200 --table-lr 0.1      # one CPU thread, ~2-7 minutes
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from minitagpr.model.presets import tiny_config
from minitagpr.model.reward import PRMU, bradley_terry_loss
from minitagpr.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from timing import machine_line  # bench/ is on sys.path: run as python bench/X.py

OPTIONS = 15  # answers per task (the demo world's LaMP-2 has 15 tags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=24)  # the demo world's training users
    ap.add_argument("--tasks", type=int, default=1)
    ap.add_argument("--length", type=int, default=300)  # filler tokens (demo PRMU inputs are ~220 tokens)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--table-lr", type=float, default=1e-1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-init", choices=("equal", "distinct"), default="equal",
                    help="equal: every row the same vector (PRMU.init_user_table); distinct: one draw per row")
    a = ap.parse_args()
    print(machine_line())
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = tiny_config("demo", vocab_size=2048)
    model = PRMU(cfg, [f"u{i:03d}" for i in range(a.users)])
    model.init_weights(a.seed)
    if a.table_init == "distinct":
        with torch.no_grad():
            std = float(model.model.embed_tokens.weight.std())
            model.user_table.weight.copy_(torch.randn(model.user_table.weight.shape,
                                                      generator=torch.Generator().manual_seed(a.seed + 1)) * std)
    table = [{"params": [model.user_table.weight], "lr": a.table_lr, "weight_decay": 0.0}]
    opt = build_optimizer(model, a.lr, extra_groups=table)
    rng = random.Random(a.seed)
    answers = [list(range(1000 + 20 * t, 1000 + 20 * t + OPTIONS)) for t in range(a.tasks)]  # (T, 15) token ids
    fav = [[rng.choice(answers[t]) for t in range(a.tasks)] for _ in range(a.users)]  # (U, T)

    def batch(n: int, g: random.Random, mirrored: bool):
        users = [g.randrange(a.users) for _ in range(n)]
        chosen, rejected = [], []
        for u in users:
            t = g.randrange(a.tasks)
            filler = [g.randrange(10, 900) for _ in range(a.length)]
            pool = [fav[v][t] for v in range(a.users)] if mirrored else answers[t]
            other = g.choice([x for x in pool if x != fav[u][t]])
            chosen.append([1900 + t] + filler + [fav[u][t], 5, 6])
            rejected.append([1900 + t] + filler + [other, 5, 6])
        ids = torch.tensor(chosen + rejected)  # (2n, L + 4)
        lengths = torch.full((2 * n,), ids.shape[1])
        rows = torch.tensor([u + 1 for u in users] * 2)  # (2n,) rows of E (row 0 = unknown user)
        return ids, lengths, rows

    g, t0 = random.Random(a.seed + 1), time.perf_counter()
    model.train()
    for step in range(a.steps):
        set_lr(opt, lr_at(step, a.steps, 5, 0.1))
        ids, lengths, rows = batch(a.batch, g, mirrored=False)
        f = model(ids, lengths, rows)
        bradley_terry_loss(f[:a.batch], f[a.batch:]).backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    model.eval()
    acc = {}
    with torch.no_grad():
        for mirrored in (False, True):
            ge, right, n = random.Random(99), 0, 0
            for _ in range(20):
                ids, lengths, rows = batch(16, ge, mirrored)
                f = model(ids, lengths, rows)
                right, n = right + int((f[:16] > f[16:]).sum()), n + 16
            acc[mirrored] = right / n
    visits = a.steps * a.batch / (a.users * a.tasks)
    print(f"users={a.users} tasks={a.tasks} length={a.length} steps={a.steps} batch={a.batch} lr={a.lr:g} "
          f"table_lr={a.table_lr:g} table_init={a.table_init}: {visits:.1f} visits per (user, task); held-out acc vs any answer "
          f"{acc[False]:.3f}, mirrored {acc[True]:.3f} ({train_s:.0f} s training)")


if __name__ == "__main__":
    main()
