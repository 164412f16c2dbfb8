"""The RL loop shared by guided RL (Stage 2, composite reward) and exploratory RL (Stage 3, foundation reward).

One step, as in docs/design.md:
    prompts (task mix) -> rollout G responses each -> rewards r_i -> group advantages A_i
    -> old log-probs (policy, no grad) -> GSPO mini-batches (forward -> fused log-probs -> loss -> backward -> step)
    -> weight sync to the rollout engine
Every arrow is one function below; `train(cfg)` strings them together with checkpoints, resume and logging.
Distribution: every rank rolls out and scores its own slice of the step's prompts (groups never straddle ranks),
the policy is FSDP2-sharded, and losses carry their global normaliser (gradients are summed over ranks).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minitagpr import distributed as D
from minitagpr.data import lamp
from minitagpr.data.prompts import build_messages
from minitagpr.data.retrieval import get_retriever
from minitagpr.rewards import score_batch
from minitagpr.rl.gspo import group_advantage_metrics, group_advantages, gspo_loss
from minitagpr.tokenizer import Tokenizer
from minitagpr.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr


class NonFiniteError(RuntimeError):
    """A reward or loss that is NaN/inf: the run stops at that step, naming it (the last checkpoint stays)."""


@dataclass
class RLConfig:
    stage: str = "guided"  # "guided": R = alpha(R_v + R_rep)R_f + beta R_tag + gamma R_PRMU; "exploratory": foundation
    policy: str = ""  # HF folder of the starting policy (SFT export for guided, guided export for exploratory)
    prmu: str = ""  # HF folder of the PRMU (guided only; "" with use_prmu=false)
    out_dir: str = "runs/guided_rl"
    # data: LaMP-format root (a LaMP download or the demo world) and the task mix "task:count,..." (0 = all)
    data_root: str = ""
    split: str = "user"
    part: str = "train"
    tasks: str = "LaMP-1:1024,LaMP-2:3200,LaMP-3:1024,LaMP-4:1024,LaMP-5:1024,LaMP-7:1024"
    retriever: str = "recency"
    k: int = 8
    max_prompt_tokens: int = 2048
    prompt_style: str = "full"  # "full" | "brief" instruction (minitagpr.data.prompts); the one the policy was SFT'd on
    # rollout
    engine: str = "builtin"  # "builtin" (torch sampler) | "vllm" (GPU)
    group_size: int = 5  # G
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    # optimisation
    prompts_per_step: int = 128  # global batch of prompts; each yields G responses
    num_minibatches: int = 4  # optimizer steps per rollout batch; 1 (with ppo_epochs=1) makes the ratio exactly 1
    ppo_epochs: int = 1
    micro_batch_size: int = 8  # sequences per forward/backward (memory only; never changes the gradient)
    epochs: float = 13.0
    lr: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # constant lr after warmup by default
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    token_level: bool = False  # GSPO-token variant
    # reward (paper: alpha = beta = 0.8, gamma = 0.2); ablation switches
    alpha: float = 0.8
    beta: float = 0.8
    gamma: float = 0.2
    use_tag_reward: bool = True
    use_prmu: bool = True
    prmu_user_table: bool = True  # False = the paper's "PRMU w/o UE" row
    rouge_variant: str = "rougeL"
    # plumbing
    seed: int = 0
    save_every: int = 50
    keep_last: int = 2
    resume: bool = True
    max_steps: int = 0  # > 0 caps the number of RL steps (smoke tests, demo)
    activation_checkpointing: bool = False
    mixed_precision: str = "auto"

    def __post_init__(self):
        if self.stage not in ("guided", "exploratory"):
            raise ValueError(f"stage must be 'guided' or 'exploratory', got {self.stage!r}")
        if self.group_size < 2:
            raise ValueError("group_size (G) must be >= 2: group advantages need at least two responses")
        if self.num_minibatches < 1 or self.ppo_epochs < 1:
            raise ValueError("num_minibatches and ppo_epochs must be >= 1")
        if self.num_minibatches > self.group_size:
            raise ValueError(f"num_minibatches={self.num_minibatches} > group_size={self.group_size}: mini-batch m "
                             "takes response m mod M of every prompt, so M may not exceed G")


# ----------------------------------------------------------------------------------------------- 1. prompts
@dataclass
class Prompt:
    id: str
    task: str
    user: str
    messages: list[dict]
    ids: list[int]
    gold: str


def parse_task_mix(spec: str) -> list[tuple[str, int]]:
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        try:
            out.append((lamp.canonical_task(name), int(count or 0)))
        except ValueError:
            raise ValueError(f"tasks: cannot parse {part!r}; expected 'task:count' (count 0 = all)") from None
    if not out:
        raise ValueError("tasks: the task mix is empty")
    return out


def load_prompts(cfg: RLConfig, tokenizer: Tokenizer, *, part: str | None = None) -> list[Prompt]:
    """The task mix: `count` examples per task drawn with a fixed seed, rendered as chat prompts (thinking on)."""
    retriever = get_retriever(cfg.retriever, seed=cfg.seed)
    prompts = []
    for task, count in parse_task_mix(cfg.tasks):
        qpath, opath = lamp.split_files(cfg.data_root, task, cfg.split, part or cfg.part)
        examples = lamp.load_questions(qpath, task)
        _, golds = lamp.load_outputs(opath)
        if count and count < len(examples):
            examples = random.Random(f"{cfg.seed}/{task}").sample(examples, count)
        for ex in examples:
            if ex.id not in golds:
                raise lamp.DataError(f"{opath}: no gold output for question id {ex.id!r} of {qpath}")
            messages = build_messages(ex, retriever.select(ex, cfg.k), tokenizer, cfg.max_prompt_tokens,
                                      style=cfg.prompt_style)
            ids = tokenizer.apply_chat(messages, add_generation_prompt=True, enable_thinking=True)
            prompts.append(Prompt(ex.id, task, ex.user, messages, ids, golds[ex.id]))
    return prompts


def prompts_for_step(step: int, num_prompts: int, per_step: int, seed: int) -> list[int]:
    """Global prompt indices of RL step `step`: epoch e visits a seeded permutation; a step never mixes epochs
    (the tail of an epoch shorter than a batch is dropped), so resume at any step -- epoch boundaries included --
    continues exactly (the verl #7401 trap)."""
    steps_per_epoch = num_prompts // per_step
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return order[within * per_step:(within + 1) * per_step]


# ----------------------------------------------------------------------------------------------- 2. rollout
def rollout(engine, prompts: list[Prompt], cfg: RLConfig, tokenizer: Tokenizer, seed: int):
    """G completions per prompt, flattened prompt-major: response j of prompt i sits at i*G + j."""
    groups = engine.generate([p.ids for p in prompts], n=cfg.group_size, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                             stop_token_ids=sorted({tokenizer.im_end_id, tokenizer.eos_id}), seed=seed)
    return [c for g in groups for c in g]


# ----------------------------------------------------------------------------------------------- 3. rewards
def compute_rewards(prompts: list[Prompt], completions, cfg: RLConfig, prmu=None):
    """RewardParts per response (every component kept for logging) and the rewards r_i as a (B*G,) fp64 tensor."""
    G = cfg.group_size
    tasks = [p.task for p in prompts for _ in range(G)]
    golds = [p.gold for p in prompts for _ in range(G)]
    texts = [c.text for c in completions]
    prmu_scores = None
    if cfg.stage == "guided" and cfg.use_prmu and cfg.gamma != 0.0:
        prmu_scores = prmu.score([p.user for p in prompts for _ in range(G)],
                                 [p.messages for p in prompts for _ in range(G)], texts)
    mix = "composite" if cfg.stage == "guided" else "foundation"
    beta = cfg.beta if cfg.use_tag_reward else 0.0
    gamma = cfg.gamma if cfg.use_prmu else 0.0
    parts = score_batch(tasks, texts, golds, prmu=prmu_scores, mix=mix, alpha=cfg.alpha, beta=beta, gamma=gamma,
                        rouge_variant=cfg.rouge_variant)
    rewards = torch.tensor([p.total for p in parts], dtype=torch.float64)  # (B*G,)
    return parts, rewards


# ----------------------------------------------------------------------------------------------- 4. batch tensors
def make_sequences(prompts: list[Prompt], completions, G: int, pad_id: int):
    """Prompt + response token rows, right-padded: input_ids (N, T), targets (N, T) with -100 outside the response
    (the loss and the ratio see response tokens only), mask (N, T) bool of response target positions."""
    rows = [(prompts[i // G].ids, c.token_ids) for i, c in enumerate(completions)]
    T = max(len(p) + len(r) for p, r in rows) - 1
    N = len(rows)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    targets = torch.full((N, T), -100, dtype=torch.long)
    for n, (p, r) in enumerate(rows):
        seq = p + r
        input_ids[n, :len(seq) - 1] = torch.tensor(seq[:-1])
        if r:  # position t predicts seq[t + 1]; response tokens are predicted from len(p) - 1 on
            targets[n, len(p) - 1:len(seq) - 1] = torch.tensor(r)
    return input_ids, targets, targets != -100


@torch.no_grad()
def sequence_logprobs(model, input_ids, targets, micro: int) -> torch.Tensor:
    """log pi(y_t | ...) of every target token, no grad: the old (behaviour) log-probs. (N, T) fp32, 0 off-mask."""
    out = [model(input_ids[s:s + micro], targets=targets[s:s + micro])[0] for s in range(0, len(input_ids), micro)]
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- 5. GSPO update
def minibatch_index(num_sequences: int, G: int, num_minibatches: int) -> list[torch.Tensor]:
    """Row indices of each mini-batch: response j of every prompt goes to mini-batch j mod M. Every mini-batch
    holds responses of every prompt, and the split depends on nothing but (G, M) -- the same sequences form
    mini-batch m whatever the number of ranks, so 1 and N processes take identical optimizer steps."""
    j = torch.arange(num_sequences) % G  # response index within its group (rows are prompt-major)
    return [torch.nonzero(j % num_minibatches == m).flatten() for m in range(num_minibatches)]


def gspo_update(model, optimizer, batch: dict, cfg: RLConfig, device) -> dict:
    """ppo_epochs x num_minibatches optimizer steps over this rank's share of the rollout batch. Each mini-batch's
    loss is -sum_i objective_i / (global count of non-empty sequences in the mini-batch): gradients are summed over
    ranks and micro-batches, so every sequence weighs the same whatever its length and wherever it runs."""
    N = batch["input_ids"].shape[0]
    stats: list[dict] = []
    for _ in range(cfg.ppo_epochs):
        for rows in minibatch_index(N, cfg.group_size, cfg.num_minibatches):
            nonempty = batch["mask"][rows].any(dim=1).sum().to(torch.float64)
            n_global = int(D.all_reduce_sum(nonempty.to(device)).item())
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            metrics = []
            for s in range(0, len(rows), cfg.micro_batch_size):
                mb = {k: v[rows[s:s + cfg.micro_batch_size]].to(device) for k, v in batch.items()}
                logp, _ = model(mb["input_ids"], targets=mb["targets"])  # (b, T) fp32, 0 off-mask
                loss, m = gspo_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], eps_low=cfg.eps_low,
                                    eps_high=cfg.eps_high, token_level=cfg.token_level,
                                    num_sequences=max(n_global, 1))
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"non-finite GSPO loss ({loss.item()}) in a mini-batch")
                loss.backward()
                loss_sum += loss.detach().double()
                metrics.append((len(mb["input_ids"]), m))
            loss_global = D.all_reduce_sum(loss_sum).item()  # the mini-batch's loss over all ranks
            grad_norm = clip_grad_norm(model, cfg.grad_clip)
            if not math.isfinite(grad_norm):
                raise NonFiniteError(f"non-finite gradient norm ({grad_norm})")
            optimizer.step()
            stats.append({"loss": loss_global, "grad_norm": grad_norm, **_weighted_mean(metrics)})
    return _weighted_mean([(1, s) for s in stats])


def _weighted_mean(items: list[tuple[float, dict]]) -> dict:
    """Mean of numeric dict entries, weighted; `*_min` / `*_max` keys take min / max instead."""
    out: dict = {}
    total = sum(w for w, _ in items) or 1
    for key in {k for _, d in items for k in d}:
        vals = [(w, d[key]) for w, d in items if key in d and isinstance(d[key], (int, float))]
        if not vals:
            continue
        if key.endswith("_min"):
            out[key] = min(v for _, v in vals)
        elif key.endswith("_max"):
            out[key] = max(v for _, v in vals)
        else:
            out[key] = sum(w * v for w, v in vals) / total
    return out


# ----------------------------------------------------------------------------------------------- 6. weight sync
def sync_to_engine(model, engine) -> float:
    """Collective: stream each parameter's full tensor under its HF name into the engine; returns seconds."""
    t0 = time.perf_counter()

    def full_tensors():
        for name, p in model.named_parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p  # all-gather of the FSDP2 shards
            yield name, t.detach()
    engine.sync_weights(full_tensors())
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- 7. the loop
def reward_metrics(parts, rewards: torch.Tensor, completions) -> dict:
    """Per-step means of every reward component, pass rates and response lengths (local sums; see `train`)."""
    n = len(parts)
    m = {"reward_mean": rewards.mean().item(), "response_len_mean": sum(len(c.token_ids) for c in completions) / n,
         "truncated_share": sum(c.finish_reason == "length" for c in completions) / n}
    for key in ("r_v", "r_f", "r_rep", "r_tag", "r_prmu"):
        vals = [getattr(p, key) for p in parts if getattr(p, key, None) is not None]
        if vals:
            m[f"{key}_mean"] = sum(vals) / len(vals)
    m["format_pass_rate"] = sum(p.r_f == 1.0 for p in parts) / n
    m["tag_pass_rate"] = sum(p.r_tag == 0.0 for p in parts) / n
    return m


def _global_mean(metrics: dict, weight: int, device) -> dict:
    """Average metric dicts over ranks, weighted by each rank's count (min/max keys reduced accordingly)."""
    keys = sorted(metrics)
    if D.world().world_size == 1:
        return metrics
    vals = torch.tensor([metrics[k] * weight if not k.endswith(("_min", "_max")) else 0.0 for k in keys] + [weight],
                        dtype=torch.float64, device=device)
    D.all_reduce_sum(vals)
    out = {k: (vals[i] / vals[-1]).item() for i, k in enumerate(keys)}
    for i, k in enumerate(keys):
        if k.endswith(("_min", "_max")):
            t = torch.tensor([metrics[k]], dtype=torch.float64, device=device)
            op = torch.distributed.ReduceOp.MIN if k.endswith("_min") else torch.distributed.ReduceOp.MAX
            torch.distributed.all_reduce(t, op=op)
            out[k] = t.item()
    return out


def build_engine(cfg: RLConfig, tokenizer: Tokenizer, info):
    from minitagpr.model import load_pretrained
    if cfg.engine == "vllm":
        from minitagpr.rollout.vllm_engine import VLLMEngine
        return VLLMEngine(cfg.policy, seed=cfg.seed)
    from minitagpr.rollout.builtin import BuiltinEngine
    # the engine keeps its own full (unsharded) copy: FSDP2 shards never leave the policy; weights sync after steps
    model = load_pretrained(cfg.policy, dtype=torch.float32, device=info.device).eval()
    return BuiltinEngine(model, tokenizer)


def train(cfg: RLConfig) -> Path:
    """Run (or resume) one RL stage; returns the HF export folder `<out_dir>/export`."""
    info = D.init_distributed()
    out = Path(cfg.out_dir)
    export_dir, ckpt_dir, log_path = out / "export", out / "checkpoints", out / "metrics.jsonl"
    torch.manual_seed(cfg.seed)
    tokenizer = Tokenizer.from_dir(cfg.policy)

    # 1. data: the same prompt list on every rank; each step takes a global batch and splits it by rank
    prompts = load_prompts(cfg, tokenizer)
    if cfg.prompts_per_step % info.world_size:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the world size "
                         f"({info.world_size})")
    if len(prompts) < cfg.prompts_per_step:
        raise ValueError(f"the task mix has {len(prompts)} prompts, fewer than prompts_per_step="
                         f"{cfg.prompts_per_step}")
    steps_per_epoch = len(prompts) // cfg.prompts_per_step
    total_steps = max(1, int(cfg.epochs * steps_per_epoch))
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)

    # 2. policy (FSDP2), optimizer, rollout engine, reward model
    model = D.build_sharded_causal_lm(cfg.policy, info, D.device_mesh(info), mp_mode=cfg.mixed_precision,
                                      activation_checkpointing=cfg.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.lr, weight_decay=cfg.weight_decay)
    engine = build_engine(cfg, tokenizer, info)
    prmu = None
    if cfg.stage == "guided" and cfg.use_prmu and cfg.gamma != 0.0:
        from minitagpr.model.reward import PRMUScorer
        prmu = PRMUScorer.from_pretrained(cfg.prmu, tokenizer, device=info.device,
                                          use_user_table=cfg.prmu_user_table)
    start = 0
    latest = D.latest_checkpoint(ckpt_dir) if cfg.resume else None
    if latest is not None:
        start = D.load_checkpoint(latest, model, optimizer)["step"]
        D.log(f"[{cfg.stage}] resumed from {latest} at step {start}")
    if start > 0:
        sync_to_engine(model, engine)  # the engine starts from the checkpoint's weights, not the initial policy
    if cfg.num_minibatches == 1 and cfg.ppo_epochs == 1:
        D.log(f"[{cfg.stage}] note: one mini-batch and one epoch per rollout batch -> the GSPO ratio is exactly 1 "
              "and clipping never acts (the update is the plain policy gradient); raise num_minibatches or "
              "ppo_epochs for the clip range to matter")
    if info.is_main:  # the log holds exactly the steps the checkpoint has seen (a crash may have logged more)
        out.mkdir(parents=True, exist_ok=True)
        kept = [l for l in (log_path.read_text().splitlines() if log_path.exists() else [])
                if l.strip() and json.loads(l)["step"] <= start]
        log_path.write_text("".join(l + "\n" for l in kept))
    D.log(f"[{cfg.stage}] {len(prompts)} prompts, {steps_per_epoch} steps/epoch, {total_steps} steps, "
          f"G={cfg.group_size}, {cfg.prompts_per_step} prompts/step on {info.world_size} rank(s)")

    per_rank = cfg.prompts_per_step // info.world_size
    t_run = time.perf_counter()
    for step in range(start, total_steps):
        D.fault_point("step", step)  # crash-recovery tests kill the run here
        t0 = time.perf_counter()
        idx = prompts_for_step(step, len(prompts), cfg.prompts_per_step, cfg.seed)
        mine = [prompts[i] for i in idx[info.rank * per_rank:(info.rank + 1) * per_rank]]

        # rollout: seeds depend on (run seed, step, rank) only, so a resumed step samples what it sampled before
        completions = rollout(engine, mine, cfg, tokenizer, seed=(cfg.seed * 1_000_003 + step) * 4099 + info.rank)
        t_rollout = time.perf_counter() - t0

        parts, rewards = compute_rewards(mine, completions, cfg, prmu)
        if not torch.isfinite(rewards).all():
            bad = [i for i, r in enumerate(rewards.tolist()) if not math.isfinite(r)]
            raise NonFiniteError(f"[{cfg.stage}] step {step}: non-finite reward for responses {bad[:5]} (prompt ids "
                                 f"{[mine[i // cfg.group_size].id for i in bad[:5]]}); stopping")
        advantages = group_advantages(rewards, cfg.group_size)  # (B*G,) A_i = (r_i - mean_g) / (std_g + eps)
        adv_metrics = group_advantage_metrics(rewards, cfg.group_size)

        input_ids, targets, mask = make_sequences(mine, completions, cfg.group_size, tokenizer.pad_id)
        t1 = time.perf_counter()
        model.train()
        old_logp = sequence_logprobs(model, input_ids.to(info.device), targets.to(info.device),
                                     cfg.micro_batch_size).cpu()
        batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "old_logp": old_logp,
                 "advantages": advantages.float()}
        set_lr(optimizer, lr_at(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
        try:
            train_metrics = gspo_update(model, optimizer, batch, cfg, info.device)
        except NonFiniteError as e:
            raise NonFiniteError(f"[{cfg.stage}] step {step}: {e}; stopping (last checkpoint kept)") from None
        t_train = time.perf_counter() - t1
        t_sync = sync_to_engine(model, engine)

        local = {**reward_metrics(parts, rewards, completions), **adv_metrics, **train_metrics}
        row = _global_mean(local, len(completions), info.device)
        tokens = D.all_reduce_sum(torch.tensor(float(mask.sum() + (input_ids != tokenizer.pad_id).sum()),
                                               dtype=torch.float64, device=info.device)).item()
        elapsed = time.perf_counter() - t0
        row.update(step=step + 1, lr=optimizer.param_groups[0]["lr"], rollout_s=t_rollout, train_s=t_train,
                   sync_s=t_sync, step_s=elapsed, tokens_per_s=tokens / elapsed)
        if info.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            eta = (time.perf_counter() - t_run) / (step + 1 - start) * (total_steps - step - 1)
            print(f"[{cfg.stage}] step {step + 1}/{total_steps} reward {row['reward_mean']:.3f} "
                  f"fmt {row['format_pass_rate']:.2f} tag {row['tag_pass_rate']:.2f} len "
                  f"{row['response_len_mean']:.0f} {elapsed:.1f}s eta {eta:.0f}s", flush=True)
        if cfg.save_every > 0 and (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
            D.save_checkpoint(ckpt_dir, step + 1, model, optimizer, {"stage": cfg.stage}, keep_last=cfg.keep_last)

    D.export_hf(model, export_dir, tokenizer_dir=cfg.policy)
    D.log(f"[{cfg.stage}] exported {export_dir}")
    return export_dir
