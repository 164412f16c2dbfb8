"""Train PRMU (tagpr-method.md, "PRMU") with the Bradley-Terry loss on the PRP and PQP preference sets (and, in
the demo, the demo world's "style" pairs: a hidden per-user preference, see data/preferences.py).

    torchrun --nproc_per_node=8 recipes/train_prmu.py --config recipes/configs/prmu_qwen3_0.6b.yaml
    torchrun --nproc_per_node=2 recipes/train_prmu.py --config recipes/configs/prmu_demo.yaml \
        demo_world=runs/demo/world init_preset=demo out_dir=runs/prmu_demo [key=value ...]
    from recipes.train_prmu import PrmuConfig, run; run(cfg) -> Path of the exported reward model

Objective (theta_r = backbone + head, E = user table, optimised jointly; E may have its own learning rate):
    J = -(1/N) * sum_{(x+, x-) in step} log sigmoid(f(x+) - f(x-))
with N the number of pairs in the whole optimizer step over every rank and micro-batch (the global batch; the tail
of an epoch is dropped, so N = global_batch always). FSDP sums gradients over ranks (divide factor 1), so any
world size and accumulation gives the gradient of one big batch.

1. config   2. preference pairs   3. model (FSDP2)   4. optimizer   5. held-out evaluation   6. train loop
7. checkpoints and export
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minitagpr import distributed as D
from minitagpr.atomic import atomic_write_json
from minitagpr.cli import run_recipe
from minitagpr.config import (ConfigError, check_at_least, check_choice, check_number, check_optimizer,
                              check_resumed_config, parse_cli, save_config, to_dict)
from minitagpr.data import demo_world
from minitagpr.data.preferences import (SETS, PreferenceDataError, PreferencePair, read_pairs, split_heldout,
                                        write_pairs)
from minitagpr.model.checkpoint import resolve_checkpoint
from minitagpr.model.presets import PRESETS, make_tiny_checkpoint
from minitagpr.model.qwen3 import Qwen3Config
from minitagpr.model.reward import (PRMU, UserVocab, bradley_terry_loss, collate, encode_reward_input,
                                    load_reward_model, save_reward_model)
from minitagpr.tokenizer import Tokenizer
from minitagpr.train.loss import NonFiniteLossError
from minitagpr.train.metrics import JsonlLog, Progress
from minitagpr.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr, warmup_note
from minitagpr.train.sft_data import batch_split_hint, micro_batches, rank_slice, rows_for_step, steps_per_epoch


# ----------------------------------------------------------------------------------------------- 1. config
@dataclass
class PrmuConfig:
    # data: pair files (PRP and PQP may share a file; each pair names its set), or a demo world to synthesise from
    pairs: list[str] = field(default_factory=list)  # pair JSONL files (`python -m minitagpr.data.preferences
    #                                                 from-rollouts` writes prp.jsonl and pqp.jsonl)
    heldout_pairs: list[str] = field(default_factory=list)  # empty: hold out `heldout_frac` of the queries
    heldout_frac: float = 0.1  # share of the queries (example ids; seeded) whose pairs are held out, in (0, 1)
    demo_world: str = ""  # a demo world folder (built there if missing): synthesise pairs from it
    demo_pairs_per_set: int = 0  # cap on synthetic pairs per set (0 = all)
    tokenizer: str = ""  # default: the demo world's tokenizer, else the `init` folder
    # tokens per scored sequence (longer ones lose their oldest tokens); recorded in the export, so guided RL scores
    # with the same length (its prmu_max_len=0)
    max_len: int = 2048
    # model
    init: str = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"  # a sequence classifier, or a causal LM with new_head
    new_head: bool = False  # start from a causal LM: drop lm_head, fresh score head (implied by init_preset)
    init_preset: str = ""  # instead of `init`: a seeded random model of this preset (e.g. "demo"), for the demo
    use_user_table: bool = True  # False = the paper's "PRMU w/o UE"
    user_dropout: float = 0.1  # share of training pairs read with row 0, so the unknown-user row is trained too
    # optimisation
    epochs: float = 1.0  # passes over the training pairs; fractional is fine (steps = ceil(epochs x steps/epoch))
    max_steps: int = 0  # > 0: exactly this many optimizer steps (into further epochs if needed), instead of epochs
    global_batch: int = 64  # pairs per optimizer step, over all ranks
    micro_batch: int = 2  # pairs per forward (2x sequences) on one rank
    lr: float = 2e-6  # peak lr of the backbone and score head (AdamW; linear warmup, then cosine decay)
    table_lr: float = 1e-4  # peak lr of the user embedding table (same schedule; never weight-decayed)
    weight_decay: float = 0.0  # AdamW decay, on weight matrices only (not the user table)
    warmup_steps: int = 10  # optimizer steps of linear warmup
    min_lr_ratio: float = 0.1  # lr at the last step, as a share of lr and table_lr (1 = constant after warmup)
    max_grad_norm: float = 1.0  # clip the global grad norm to this (0 = no clipping)
    mixed_precision: str = "auto"  # auto | bf16 | fp32; auto: bf16 compute + fp32 reduce on GPU, fp32 on CPU
    activation_checkpointing: bool = False  # recompute each block's activations in the backward: less memory, slower
    seed: int = 0  # pair order, user dropout, the held-out split, synthetic pairs; the random init of a new score
    #                head, the user table and an init_preset model
    # run
    out_dir: str = "runs/prmu"  # config.yaml, metrics.jsonl, pairs/, checkpoints/, hf/ (the export), final_eval.json
    eval_every: int = 50  # steps; 0 = only at the end
    eval_batch: int = 8  # pairs per forward in evaluation
    save_every: int = 100  # steps; 0 = only at the end
    keep_last: int = 2  # how many of the newest checkpoints out_dir/checkpoints keeps (0 = all)
    resume: bool = True  # continue from the newest checkpoint in out_dir/checkpoints; false deletes them
    log_every: int = 1  # a metrics.jsonl row every N optimizer steps (and at the last)

    def __post_init__(self):
        if not self.pairs and not self.demo_world:
            raise ValueError("give preference files (pairs=a.jsonl,b.jsonl) or a demo world (demo_world=DIR)")
        if self.pairs and self.demo_world:
            raise ValueError("pairs= and demo_world= are alternatives; give one")
        if not 0.0 <= self.user_dropout < 1.0:
            raise ValueError(f"user_dropout must be in [0, 1), got {self.user_dropout}")
        if not self.heldout_pairs and not 0.0 < self.heldout_frac < 1.0:
            raise ValueError(f"heldout_frac must be in (0, 1) when no heldout_pairs are given, got {self.heldout_frac}")
        for key in ("global_batch", "micro_batch", "eval_batch", "log_every", "max_len"):
            check_at_least(key, getattr(self, key), 1)
        check_number("epochs", self.epochs, 0.0, lo_open=True)  # 0 or less trained one step without a word
        check_at_least("max_steps", self.max_steps, 0)  # 0 = epochs decide; a negative value read as 0
        for key in ("eval_every", "save_every", "keep_last"):  # 0 has a meaning; a negative value was read as 0
            check_at_least(key, getattr(self, key), 0)
        check_number("seed", self.seed, 0, 2**31, hi_open=True)  # seed x 1,000,003 + step must fit a torch seed
        check_optimizer(self, lrs=("lr", "table_lr"), grad_clip="max_grad_norm", warmup="warmup_steps",
                        warmup_max=math.inf)
        check_choice("mixed_precision", self.mixed_precision, ("auto", "bf16", "fp32"))
        if self.init_preset:
            check_choice("init_preset", self.init_preset, PRESETS)
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch={self.global_batch} is not a multiple of micro_batch={self.micro_batch}")


# Settings a resumed run may change (paths, logging and evaluation cadence, checkpoints, memory knobs); any other
# difference from the checkpoint's config is an error (lr, table_lr, schedule, batch, user table, seed...).
RESUMABLE_KEYS = {"pairs", "heldout_pairs", "demo_world", "tokenizer", "init", "new_head", "init_preset", "out_dir",
                  "eval_every", "eval_batch", "save_every", "keep_last", "resume", "log_every", "micro_batch",
                  "activation_checkpointing"}


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    user_row: int
    set: str
    user_dependent: bool
    cut: bool = False  # a side was longer than max_len and lost its oldest tokens


def check_batch_split(cfg: PrmuConfig, world_size: int) -> None:
    """An error unless global_batch splits into micro-batches of micro_batch pairs on each of the ranks."""
    if cfg.global_batch % (cfg.micro_batch * world_size):
        raise ConfigError(f"global_batch={cfg.global_batch} must split into micro-batches of {cfg.micro_batch} "
                          f"pairs on each of {world_size} ranks: "
                          f"{batch_split_hint(cfg.global_batch, cfg.micro_batch, world_size)}")


def run(cfg: PrmuConfig) -> Path:
    """Train (or resume) and export; returns the HF folder of the trained reward model (out_dir/hf)."""
    info = D.init_distributed()
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    check_batch_split(cfg, info.world_size)

    # ------------------------------------------------------------------------------------------- 2. pairs
    # rank 0 builds; its error stops every rank (distributed.on_main), and the others wait for the files
    if cfg.demo_world:
        D.on_main(lambda: demo_world.build(cfg.demo_world))  # reuses a complete world; builds one otherwise
    if cfg.init_preset:  # a seeded random causal LM saved where `init` would be read from
        D.on_main(lambda: make_tiny_checkpoint(out / "init", preset=cfg.init_preset, seed=cfg.seed,
                                               tokenizer_dir=tokenizer_dir(cfg)))
    init = str(out / "init") if cfg.init_preset else cfg.init
    train_pairs, heldout = load_pair_sets(cfg)
    users = UserVocab(p.user for p in train_pairs)  # the table's rows: users seen in training
    tokenizer = Tokenizer.from_dir(tokenizer_dir(cfg))
    train = [encode_pair(p, tokenizer, users, cfg.max_len) for p in train_pairs]
    held = [encode_pair(p, tokenizer, users, cfg.max_len) for p in heldout]
    if info.is_main:
        counts = {s: sum(p.set == s for p in train_pairs) for s in SETS}
        D.log(f"[prmu] {len(train)} training pairs {counts}, {len(held)} held out, {len(users)} users, "
              f"user table {'on' if cfg.use_user_table else 'off'}; pairs longer than max_len={cfg.max_len} (their "
              f"oldest tokens dropped): {sum(e.cut for e in train)} training, {sum(e.cut for e in held)} held out")
    spe = steps_per_epoch(len(train), cfg.global_batch, "training pairs", "lower global_batch or add pairs")
    # 1.1 x 50 is 55.00000000000001: 55 steps, not 56 (RL's int() has the mirror guard)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * spe - 1e-9))
    if note := warmup_note(cfg.warmup_steps, total_steps):
        D.log(f"[prmu] note: {note}")

    # ------------------------------------------------------------------------------------------- 3. model
    config = Qwen3Config.from_json(resolve_checkpoint(init) / "config.json")
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the model {init} only "
                          f"{config.vocab_size} embedding rows")
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_id  # transformers needs it to find the last real token of a batch
    with torch.device("meta"):
        model = PRMU(config, users, use_user_table=cfg.use_user_table)
    D.shard_model(model, D.device_mesh(info), D.mixed_precision(info.device, cfg.mixed_precision),
                  cfg.activation_checkpointing)
    # rank 0 reads the file (the others hear if it fails); the other ranks receive their shards by broadcast
    full = D.on_main(lambda: load_reward_model(init, dtype=torch.float32, use_user_table=cfg.use_user_table,
                                               users=users.users if cfg.use_user_table else None,
                                               new_head=cfg.new_head or bool(cfg.init_preset),
                                               seed=cfg.seed).state_dict()) or {}
    D.materialize_and_load(model, full, info.device)
    del full

    # ------------------------------------------------------------------------------------------- 4. optimizer
    table_group = [{"params": [model.user_table.weight], "lr": cfg.table_lr, "weight_decay": 0.0}] \
        if cfg.use_user_table else None
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, extra_groups=table_group)
    del table_group  # holds the table's sharded weight, which must not outlive the model (release_memory below)

    start_step = 0
    ckpt_dir = out / "checkpoints"
    latest = D.checkpoint_to_resume(ckpt_dir, cfg.resume, "[prmu]")
    fingerprint = data_fingerprint(train, users)
    if latest is not None:
        def check(state: dict) -> None:  # before any tensor loads (D.load_checkpoint)
            if state.get("num_train_pairs") != len(train) or state.get("num_users") != len(users):
                raise ConfigError(f"{latest}: saved for {state.get('num_train_pairs')} pairs / "
                                  f"{state.get('num_users')} users, but this run has {len(train)} / {len(users)}; "
                                  f"use a new out_dir or resume=false")
            if state.get("data_fingerprint", fingerprint) != fingerprint:  # same counts, other pairs or user rows
                raise ConfigError(f"{latest}: saved for other training pairs or users (data fingerprint "
                                  f"{state['data_fingerprint']}, this run {fingerprint}); use a new out_dir or "
                                  f"resume=false")
            # the run's length sets where the cosine ends: it may change only under a constant lr after warmup
            length = {"epochs", "max_steps"} if cfg.min_lr_ratio == 1.0 else set()
            check_resumed_config(state.get("config", {}), cfg, RESUMABLE_KEYS | length, latest)
            D.check_resumed_model(state, config, latest, "init_preset" if cfg.init_preset else "init")
            D.check_resume_step(state["step"], total_steps, latest)
        start_step = D.load_checkpoint(latest, model, optimizer, check=check)["step"]
        D.log(f"[prmu] resumed from {latest} at step {start_step}")
    def record_run() -> None:  # after the resume checks: a refused resume leaves the run's own record as it was
        write_pairs(out / "pairs" / "train.jsonl", train_pairs)  # what this run trained on, for audit
        write_pairs(out / "pairs" / "heldout.jsonl", heldout)
        save_config(cfg, out / "config.yaml")
    D.on_main(record_run)

    # rows carry the number of completed steps; a resumed run re-runs (and re-logs) steps after `start_step`
    log = JsonlLog(out / "metrics.jsonl", enabled=info.is_main, resume_step=start_step + 1 if latest else None)
    progress = Progress(total_steps, start_step, enabled=info.is_main, prefix="[prmu] ")
    state_extra = {"num_train_pairs": len(train), "num_users": len(users), "total_steps": total_steps,
                   "data_fingerprint": fingerprint, "config": to_dict(cfg), "model_config": D.model_record(config)}

    # ------------------------------------------------------------------------------------------- 6. train loop
    model.train()
    for step in range(start_step, total_steps):
        D.fault_point("step", step)  # crash-recovery tests only (MINITAGPR_FAULT)
        t0 = time.perf_counter()
        lr = set_lr(optimizer, lr_at(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
        rows = rows_for_step(step, len(train), cfg.global_batch, cfg.seed)  # the global batch, same on all ranks
        keep = user_keep_mask(step, cfg)  # (global_batch,) bool, world-size independent
        mine = rank_slice(list(range(cfg.global_batch)), info.rank, info.world_size)
        stats = torch.zeros(3, dtype=torch.float64)  # (3,) this rank's loss sum, correct pairs, tokens
        for mb in micro_batches(mine, cfg.micro_batch):
            pairs = [train[rows[i]] for i in mb]
            user_rows = [p.user_row if keep[i] else UserVocab.UNKNOWN_ROW for p, i in zip(pairs, mb)]
            stats += micro_batch_backward(model, pairs, user_rows, cfg.global_batch, tokenizer.pad_id, info.device)
        stats = D.all_reduce_sum(stats.to(info.device)).cpu()  # (3,) step totals over all ranks
        step_loss = stats[0].item()
        if not math.isfinite(step_loss):
            raise NonFiniteLossError(f"non-finite Bradley-Terry loss ({step_loss}) at step {step + 1}; stopping before "
                                     f"the optimizer step (lower lr/table_lr or check the pairs)")
        grad_norm = clip_grad_norm(model, cfg.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at step {step + 1}; stopping before the "
                                     f"optimizer step (lower lr/table_lr or check the pairs)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        D.wait_for_device(info.device)  # the step's queued GPU work is timed in this step, not the next
        dt = time.perf_counter() - t0
        done = step + 1
        if info.is_main and (done % cfg.log_every == 0 or done == total_steps):
            row = {"step": done, "epoch": done / spe, "loss": step_loss, "train_acc": stats[1].item() / cfg.global_batch,
                   "lr": lr, "grad_norm": grad_norm, "pairs_per_s": cfg.global_batch / dt,
                   "tokens_per_s": stats[2].item() / dt, "step_time_s": dt}
            log.write(row)
        progress.update(step, loss=step_loss, acc=stats[1].item() / cfg.global_batch, gnorm=grad_norm)
        if cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
            log_eval(model, held, done, cfg, tokenizer.pad_id, info, log)
        if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
            D.save_checkpoint(ckpt_dir, done, model, optimizer, state_extra, keep_last=cfg.keep_last)

    # ------------------------------------------------------------------------------------------- 7. export
    if start_step < total_steps:
        final = log_eval(model, held, total_steps, cfg, tokenizer.pad_id, info, log)
    else:  # a finished run, rerun (or killed during its export): its final eval row is in the log already
        final = evaluate(model, held, cfg, tokenizer.pad_id, info)
    D.save_checkpoint(ckpt_dir, total_steps, model, optimizer, state_extra, keep_last=cfg.keep_last)
    hf_dir = D.export_hf(model, out / "hf", tokenizer_dir=tokenizer.source, save_fn=save_reward_model,
                         training={"max_len": cfg.max_len})  # guided RL scores with the length it was trained on
    D.on_main(lambda: atomic_write_json(out / "final_eval.json", final, indent=2))  # whole or none, for every reader
    del model, optimizer
    D.release_memory()  # a caller's next stage loads in this process (the demo runs them all in one)
    return hf_dir


# ----------------------------------------------------------------------------------------------- 2. pairs (helpers)
def tokenizer_dir(cfg: PrmuConfig) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    if cfg.demo_world:
        return demo_world.DemoWorld.load(cfg.demo_world).tokenizer_dir
    return resolve_checkpoint(cfg.init)


def load_pair_sets(cfg: PrmuConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs: read from files, or synthesised from a demo world; every rank builds the same.
    The held-out split is by query; a demo world's user-dependent groups (one input, several users, different
    golds) stay on one side, so no held-out pair has its mirror image (same input, opposite winner) in training."""
    linked: list[list[str]] = []  # queries that share one input across users: held out together
    if cfg.demo_world:
        from minitagpr.data.preferences import synthesize_demo_pairs
        sets = synthesize_demo_pairs(cfg.demo_world, max_per_set=cfg.demo_pairs_per_set, seed=cfg.seed)
        pairs = [p for name in SETS for p in sets[name]]
        linked = demo_world.DemoWorld.load(cfg.demo_world).user_dependent_groups
    else:
        pairs = [p for path in cfg.pairs for p in read_pairs(path)]
        _refuse_repeats(pairs, cfg.pairs, "pairs")
    if cfg.heldout_pairs:
        train, held = pairs, [p for path in cfg.heldout_pairs for p in read_pairs(path)]
        _refuse_repeats(held, cfg.heldout_pairs, "heldout_pairs")
        trained = {p.id for p in train} | {(p.task, p.example_id) for p in train}
        leak = [p.id for p in held if p.id in trained or (p.task, p.example_id) in trained]
        if leak:  # held-out accuracy on pairs (or queries) the model trained on would mean nothing
            raise PreferenceDataError(f"{', '.join(cfg.heldout_pairs)}: {len(leak)} held-out pair(s) share an id or "
                                      f"a query (task, example_id) with the training pairs, e.g. {leak[0]!r}")
    else:
        train, held = split_heldout(pairs, cfg.heldout_frac, seed=cfg.seed, linked=linked)
    if not train or not held:
        where = ", ".join(cfg.pairs) or cfg.demo_world
        raise PreferenceDataError(f"{where}: {len(train)} training and {len(held)} held-out pairs; both must be "
                                  f"non-empty (add pairs or change heldout_frac)")
    return train, held


def _refuse_repeats(pairs: list[PreferencePair], files: list[str], key: str) -> None:
    """A pair id twice across the files (e.g. one file given twice) would train or count that pair twice."""
    first: dict[str, int] = {}
    for p in pairs:
        first[p.id] = first.get(p.id, 0) + 1
    repeated = [pid for pid, n in first.items() if n > 1]
    if repeated:
        raise PreferenceDataError(f"{key}={','.join(map(str, files))}: pair id {repeated[0]!r} appears in more than "
                                  f"one file ({len(repeated)} repeated ids); give each pair once")


def encode_pair(p: PreferencePair, tokenizer, users: UserVocab, max_len: int) -> EncodedPair:
    chosen, rejected = (encode_reward_input(tokenizer, p.prompt, r.text) for r in (p.chosen, p.rejected))
    return EncodedPair(
        chosen=chosen[-max_len:], rejected=rejected[-max_len:],  # the oldest tokens go: the scored last one stays
        user_row=users.row(p.user), set=p.set, user_dependent=p.user_dependent,
        cut=len(chosen) > max_len or len(rejected) > max_len,
    )


def user_keep_mask(step: int, cfg: PrmuConfig) -> list[bool]:
    """Which pairs of the step's global batch keep their user row (the rest read row 0, the unknown user).
    A function of (seed, step) only, so resume and world size do not change it."""
    if not cfg.use_user_table or cfg.user_dropout == 0:
        return [True] * cfg.global_batch
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 7)
    return (torch.rand(cfg.global_batch, generator=g) >= cfg.user_dropout).tolist()


def data_fingerprint(train: list[EncodedPair], users: UserVocab) -> str:
    """16 hex digits of sha256 over the user vocabulary and every training pair's tokens and user row, in order: a
    resumed run must see the same pair behind every data index and the same user behind every table row."""
    h = hashlib.sha256("\n".join(users.users).encode())
    for p in train:  # lengths, then the ids as 8-byte integers: no two different pairs hash the same bytes
        h.update(array("q", [len(p.chosen), len(p.rejected), p.user_row, *p.chosen, *p.rejected]).tobytes())
    return h.hexdigest()[:16]


def micro_batch_backward(model, pairs: list[EncodedPair], user_rows: list[int], num_pairs: int, pad_id: int,
                         device) -> torch.Tensor:
    """Accumulate the gradient of one micro-batch's share of J; returns (loss, correct pairs, tokens), float64 on
    the CPU. No tensor of the graph outlives the call: the graph reaches every sharded parameter, so a kept output
    would keep the whole model alive past `del model` and release_memory()."""
    f_pos, f_neg, n_tok = score_pairs(model, pairs, user_rows, pad_id, device)  # (b,), (b,) fp32
    loss = bradley_terry_loss(f_pos, f_neg, num_pairs=num_pairs)  # / N: the global pair count
    loss.backward()
    return torch.tensor([loss.item(), (f_pos > f_neg).sum().item(), n_tok], dtype=torch.float64)  # (3,)


def score_pairs(model, pairs: list[EncodedPair], user_rows: list[int], pad_id: int, device):
    """f(x+), f(x-) of a micro-batch in one forward: rows = chosen sequences then rejected ones."""
    ids, lengths = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)  # (2b, T)
    rows = torch.tensor(user_rows + user_rows, dtype=torch.long, device=device)  # (2b,)
    f = model(ids, lengths, rows if model.use_user_table else None)  # (2b,) fp32
    b = len(pairs)
    return f[:b], f[b:], int(lengths.sum())


# ----------------------------------------------------------------------------------------------- 5. evaluation
BUCKETS = (*SETS, "user_dependent", "all")


@torch.no_grad()
def evaluate(model, held: list[EncodedPair], cfg: PrmuConfig, pad_id: int, info) -> dict[str, float]:
    """Held-out pairwise accuracy (f(x+) > f(x-)) and mean BT loss per set (PRP, PQP, style), on the user-dependent
    pairs, and overall.

    Each rank scores every world_size-th pair. All ranks run the same number of forwards (FSDP's collectives need
    it): a rank that runs out repeats pair 0 with weight 0."""
    was_training = model.training
    model.eval()
    shard = held[info.rank::info.world_size]
    n_batches = math.ceil(math.ceil(len(held) / info.world_size) / cfg.eval_batch)
    sums = torch.zeros(len(BUCKETS), 3, dtype=torch.float64)  # per bucket: correct, count, loss sum
    for b in range(n_batches):
        pairs = shard[b * cfg.eval_batch:(b + 1) * cfg.eval_batch]
        weight = 1.0 if pairs else 0.0
        pairs = pairs or held[:1]
        f_pos, f_neg, _ = score_pairs(model, pairs, [p.user_row for p in pairs], pad_id, info.device)
        losses = -torch.nn.functional.logsigmoid(f_pos - f_neg).double().cpu()  # (b,)
        right = (f_pos > f_neg).double().cpu()  # (b,)
        for k, p in enumerate(pairs):
            for j, bucket in enumerate(BUCKETS):
                if bucket == p.set or bucket == "all" or (bucket == "user_dependent" and p.user_dependent):
                    sums[j] += weight * torch.stack([right[k], torch.tensor(1.0, dtype=torch.float64), losses[k]])
    sums = D.all_reduce_sum(sums.to(info.device)).cpu()
    model.train(was_training)
    out = {}
    for j, bucket in enumerate(BUCKETS):
        correct, count, loss = sums[j].tolist()
        if count:
            out[f"{bucket}_acc"], out[f"{bucket}_loss"], out[f"{bucket}_pairs"] = correct / count, loss / count, count
    return out


def log_eval(model, held, step, cfg, pad_id, info, log) -> dict[str, float]:
    result = evaluate(model, held, cfg, pad_id, info)
    if info.is_main:
        log.write({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
        shown = " ".join(f"{b} {result[b + '_acc']:.3f} (n={int(result[b + '_pairs'])})"
                         for b in BUCKETS if b + "_acc" in result)
        D.log(f"[prmu] eval @ step {step}: held-out pairwise accuracy {shown}")
    return result


if __name__ == "__main__":
    run_recipe("train_prmu", lambda: run(parse_cli(PrmuConfig, sys.argv[1:])))
    D.end_process()  # skip interpreter finalization (see there)
