"""PRMU training-step cost: one step of J = -(1/N) sum log sigmoid(f(x+) - f(x-)) over a batch of preference pairs,
forward + backward (+ gradient clipping and AdamW with --optim), ours vs transformers' sequence classifier.

Same weights (a seeded random model of `--preset`, by default "demo", with the demo world's tokenizer), same pairs:
the first optimizer step's global batch (`rows_for_step`, seed 0) of the demo world's synthetic PRP + PQP + style
pairs, tokenized by the recipe's `encode_pair`, split into micro-batches of `--micro-batch` pairs as
recipes/train_prmu.py does (defaults 8 and 4: global_batch and micro_batch of recipes/configs/prmu_demo.yaml). Rows:
  transformers    Qwen3ForSequenceClassification loaded from the table-less checkpoint ours saved; per micro-batch
                  one forward over the chosen then the rejected sequences, right-padded (no attention mask: causal
                  attention never lets a real token see the padding after it), the loss written plainly with torch
  ours-no-table   PRMU without the user table (the paper's "PRMU w/o UE"): the recipe's own micro_batch_backward
                  (score_pairs: one forward of 2b rows, bradley_terry_loss), the same computation as transformers
  ours-table      PRMU with the user table: one extra soft token per sequence, and the table's gradient
Every row rebuilds its padded tensors inside the timed call and ends with zero_grad(set_to_none=True), as the
recipe does; no FSDP (one process). Before timing, the loss and the score-head gradient of ours-no-table and
transformers are compared (max |diff| printed; over 1e-5 is an error). Timing runs the rows in one process,
interleaved round by round (alternating the order) after a warm-up step each; "vs transformers" is the median over
rounds of the per-round speed ratio. Peak memory: a fresh subprocess per row, resident-set growth over one step
after a warm-up step (timing.rss_growth_mb). BENCH_THREADS sets torch's threads (default 2).

    python bench/prmu_step.py --repeats 5 [--pairs 8] [--micro-batch 4] [--optim] [--preset qwen3-0.6b-2layer]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from timing import rss_growth_mb, machine_line

PATHS = ["transformers", "ours-no-table", "ours-table"]
REPO = Path(__file__).resolve().parents[1]
LR, TABLE_LR, MAX_GRAD_NORM = 1e-3, 1e-1, 1.0  # recipes/configs/prmu_demo.yaml


def load_recipe():
    """recipes/train_prmu.py is a script, not a package module: load it by path for its step functions."""
    if "train_prmu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_prmu", REPO / "recipes" / "train_prmu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_prmu"] = module  # its dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["train_prmu"]


def make_step(path: str, work: str, args) -> SimpleNamespace:
    """One row's model and its step: backward() accumulates the batch's gradient and returns the loss; finish()
    clips and steps the optimizer (--optim) and drops the gradients; step() is both."""
    import torch
    import torch.nn.functional as F
    from minitagpr.data.preferences import read_pairs
    from minitagpr.model.reward import UserVocab, load_reward_model
    from minitagpr.tokenizer import Tokenizer
    from minitagpr.train.optim import build_optimizer, clip_grad_norm
    from minitagpr.train.sft_data import micro_batches, rows_for_step

    recipe = load_recipe()
    folder = Path(work) / ("rm-table" if path == "ours-table" else "rm")
    tok = Tokenizer.from_dir(folder)
    pairs = read_pairs(Path(work) / "pairs.jsonl")
    batch = [pairs[i] for i in rows_for_step(0, len(pairs), args.pairs, seed=0)]
    if path == "transformers":
        import transformers
        transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar would interleave the table
        model = transformers.Qwen3ForSequenceClassification.from_pretrained(folder)
        users = UserVocab()
    else:
        model = load_reward_model(folder)
        users = model.users
    model.train()
    encoded = [recipe.encode_pair(p, tok, users, args.max_len) for p in batch]
    mbs = micro_batches(list(range(len(encoded))), args.micro_batch)

    if path == "transformers":
        def backward() -> float:
            total = 0.0
            for mb in mbs:
                seqs = [encoded[i].chosen for i in mb] + [encoded[i].rejected for i in mb]
                ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True,
                                                      padding_value=tok.pad_id)  # (2b, T)
                f = model(input_ids=ids).logits[:, 0]  # (2b,): chosen rows, then rejected rows
                loss = -F.logsigmoid(f[:len(mb)] - f[len(mb):]).sum() / len(encoded)
                loss.backward()
                total += loss.item()
            return total
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0, foreach=False) \
            if args.optim else None

        def clip():
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM, foreach=False)
    else:
        def backward() -> float:
            stats = sum(recipe.micro_batch_backward(model, [encoded[i] for i in mb], [encoded[i].user_row for i in mb],
                                                    len(encoded), tok.pad_id, "cpu") for mb in mbs)
            return float(stats[0])
        table = [{"params": [model.user_table.weight], "lr": TABLE_LR, "weight_decay": 0.0}] \
            if model.use_user_table else None
        optimizer = build_optimizer(model, LR, extra_groups=table) if args.optim else None

        def clip():
            clip_grad_norm(model, MAX_GRAD_NORM)

    def finish() -> None:
        if optimizer is not None:
            clip()
            optimizer.step()
        model.zero_grad(set_to_none=True)

    def step() -> float:
        loss = backward()
        finish()
        return loss

    lengths = [(len(e.chosen), len(e.rejected)) for e in encoded]
    slots = sum(2 * len(mb) * max(max(lengths[i]) for i in mb) for mb in mbs)  # padded (2b, T_max) per forward
    shared = sum(common_prefix(e.chosen, e.rejected) for e in encoded)
    return SimpleNamespace(model=model, backward=backward, finish=finish, step=step, pairs=len(encoded),
                           tokens=sum(map(sum, lengths)), slots=slots, shared=shared)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_against_transformers(ref: SimpleNamespace, ours: SimpleNamespace) -> dict:
    """Loss and gradients of one step, transformers vs ours-no-table, from the same weights; raises over 1e-5."""
    loss_ref, loss_ours = ref.backward(), ours.backward()
    ref_grads = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}
    ours_grads = {n: p.grad for n, p in ours.model.named_parameters() if p.grad is not None}
    if set(ref_grads) != set(ours_grads):
        raise AssertionError(f"gradients of different parameters: {sorted(set(ref_grads) ^ set(ours_grads))[:4]}")
    diffs = {"loss": abs(loss_ref - loss_ours),
             "head_grad": float((ref_grads["score.weight"] - ours_grads["score.weight"]).abs().max()),
             "all_grads": max(float((ref_grads[n] - ours_grads[n]).abs().max()) for n in ref_grads)}
    ref.finish()
    ours.finish()
    if diffs["loss"] > 1e-5 or diffs["head_grad"] > 1e-5:
        raise AssertionError(f"ours-no-table does not match transformers: loss {loss_ours} vs {loss_ref}, "
                             f"max |score-head grad diff| {diffs['head_grad']:.2e}")
    return diffs | {"loss_value": loss_ref}


def time_paths(work: str, args) -> tuple[dict, dict]:
    """The check, then every row in this process, interleaved round by round after one warm-up step each."""
    steps = {path: make_step(path, work, args) for path in PATHS}
    diffs = check_against_transformers(steps["transformers"], steps["ours-no-table"])
    for s in steps.values():
        s.step()  # warm-up
    secs = {path: [] for path in PATHS}
    for r in range(args.repeats):
        for path in (PATHS if r % 2 == 0 else PATHS[::-1]):
            t0 = time.perf_counter()
            steps[path].step()
            secs[path].append(time.perf_counter() - t0)
    timed = {path: {"s": statistics.median(secs[path]), "pairs": steps[path].pairs, "tokens": steps[path].tokens,
                    "slots": steps[path].slots, "shared": steps[path].shared,
                    "ratio": statistics.median(a / b for a, b in zip(secs["transformers"], secs[path]))}
             for path in PATHS}
    timed["params"] = sum(p.numel() for p in steps["ours-table"].model.parameters())
    return timed, diffs


def build_work(work: Path, preset: str) -> None:
    """Demo world, its synthetic PRP + PQP + style pairs, and one seeded model saved twice: without and with the
    table."""
    import torch
    from minitagpr.data import demo_world
    from minitagpr.data.preferences import synthesize_demo_pairs, write_pairs
    from minitagpr.model.presets import tiny_config
    from minitagpr.model.reward import PRMU, save_reward_model
    from minitagpr.tokenizer import Tokenizer

    world = demo_world.build(work / "world")
    sets = synthesize_demo_pairs(world.root)
    pairs = [p for s in sets.values() for p in s]  # what the recipe trains on
    write_pairs(work / "pairs.jsonl", pairs)
    n_rows = -(-world.stats["vocab_size"] // 64) * 64
    cfg = tiny_config(preset, vocab_size=n_rows if preset == "demo" else None)
    cfg.pad_token_id = Tokenizer.from_dir(world.tokenizer_dir).pad_id
    torch.manual_seed(0)
    with_table = PRMU(cfg, {p.user for p in pairs})
    with_table.init_weights(0)
    with torch.no_grad():
        with_table.user_table.weight.normal_(0, 0.02)  # distinct users, as after training
    no_table = PRMU(cfg, use_user_table=False)
    no_table.load_state_dict({k: v for k, v in with_table.state_dict().items() if not k.startswith("user_table.")})
    files = {n: world.tokenizer_dir / n for n in ("tokenizer.json", "tokenizer_config.json")}
    save_reward_model(no_table, work / "rm", extra_files=files)
    save_reward_model(with_table, work / "rm-table", extra_files=files)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step (global_batch)")
    ap.add_argument("--micro-batch", type=int, default=4, help="pairs per forward (2x sequences)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--optim", action="store_true", help="add gradient clipping and the AdamW step")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--child", default="")
    ap.add_argument("--work", default="")
    args = ap.parse_args()
    print(machine_line())
    import torch
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    if args.child:
        print(json.dumps(rss_growth_mb(make_step(args.child, args.work, args).step)))
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        build_work(Path(tmp), args.preset)
        timed, diffs = time_paths(tmp, args)
        for path in PATHS:
            cmd = [sys.executable, __file__, "--child", path, "--work", tmp, "--pairs", str(args.pairs),
                   "--micro-batch", str(args.micro_batch), "--max-len", str(args.max_len), "--preset", args.preset]
            out = subprocess.run(cmd + (["--optim"] if args.optim else []), capture_output=True, text=True,
                                 check=True)
            timed[path]["peak_mb"] = json.loads(out.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    first = timed[PATHS[0]]
    what = "forward + backward + clip + AdamW" if args.optim else "forward + backward"
    print(f"PRMU training step ({what} of the Bradley-Terry loss), {args.preset} preset "
          f"({timed['params'] / 1e6:.2f}M params with the table), {first['pairs']} pairs = {2 * first['pairs']} "
          f"sequences ({first['tokens']:,} real tokens) in micro-batches of {args.micro_batch} pairs, {threads} "
          f"threads, median of {args.repeats} interleaved rounds")
    print(f"load average (1, 5, 15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}")
    print("| path | ms per step | pairs/s | real tokens/s | vs transformers | peak RSS growth MB |")
    print("|---|---|---|---|---|---|")
    for path in PATHS:
        r = timed[path]
        print(f"| {path} | {r['s'] * 1e3:.0f} | {r['pairs'] / r['s']:.1f} | {r['tokens'] / r['s']:,.0f} | "
              f"{r['ratio']:.2f}x | {r['peak_mb']:.0f} |")
    print(f"check before timing, transformers vs ours-no-table (loss {diffs['loss_value']:.6f}): |loss diff| "
          f"{diffs['loss']:.2e}, max |score-head grad diff| {diffs['head_grad']:.2e}, max |grad diff| over all "
          f"parameters {diffs['all_grads']:.2e}")
    print(f"padding: {first['slots']:,} token slots for {first['tokens']:,} real tokens "
          f"({1 - first['tokens'] / first['slots']:.0%} padding); chosen and rejected share a "
          f"{first['shared']:,}-token prefix in all ({first['shared'] / first['tokens']:.0%} of the real tokens, "
          f"each run through the model twice)")


if __name__ == "__main__":
    main()
