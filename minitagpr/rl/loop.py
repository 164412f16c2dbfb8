"""The RL loop shared by guided RL (Stage 2, composite reward) and exploratory RL (Stage 3, foundation reward).

One step, as in ../shared/docs/design.md:
    prompts (task mix) -> rollout G responses each -> rewards r_i -> group advantages A_i
    -> old log-probs (policy, no grad) -> GSPO mini-batches (forward -> fused log-probs -> loss -> backward -> step)
    -> weight sync to the rollout engine
Every arrow is one function below; `train(cfg)` strings them together with checkpoints, resume and logging.
Distribution: every rank rolls out and scores its own slice of the step's prompts (groups never straddle ranks),
the policy is FSDP2-sharded, and losses carry their global normaliser (gradients are summed over ranks).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import sys
import time
from array import array
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from minitagpr import distributed as D
from minitagpr.config import (ConfigError, check_at_least, check_choice, check_number, check_fraction, check_optimizer,
                              check_resumed_config, save_config)
from minitagpr.data import lamp
from minitagpr.data.prompts import STYLES, PromptTooLongError, build_messages, style_mismatch
from minitagpr.data.retrieval import ENCODERLESS, get_retriever
from minitagpr.model.checkpoint import resolve_checkpoint
from minitagpr.model.qwen3 import Qwen3Config
from minitagpr.rewards import ROUGE_VARIANTS, TERMS, reward_terms, score_batch
from minitagpr.rl.gspo import advantage_correlations, group_advantage_metrics, group_advantages, gspo_loss
import minitagpr.rollout as engines
from minitagpr.rollout.base import sample_base
from minitagpr.rollout.builtin import BuiltinEngine
from minitagpr.tokenizer import Tokenizer
from minitagpr.train.metrics import JsonlLog, Progress, peak_flops
from minitagpr.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr, warmup_note


class NonFiniteError(RuntimeError):
    """A reward or loss that is NaN/inf: the run stops at that step, naming it (the last checkpoint stays)."""


@dataclass
class RLConfig:
    stage: str = "guided"  # "guided": R = alpha(R_v + R_rep)R_f + beta R_tag + gamma R_PRMU; "exploratory": the
    #                        foundation reward R = (R_v + R_rep)R_f
    policy: str = ""  # HF folder of the starting policy (SFT export for guided, guided export for exploratory)
    prmu: str = ""  # HF folder of the PRMU (guided only; "" with use_prmu=false)
    out_dir: str = "runs/guided_rl"  # the stage's folder: config.yaml, metrics.jsonl, checkpoints/, export/ (HF)
    # data: LaMP-format root (a LaMP download or the demo world) and the task mix "task:count,..." (0 = all)
    data_root: str = ""
    split: str = "user"  # LaMP split: user | time
    part: str = "train"  # the part whose questions are the prompts: train | dev
    tasks: str = "LaMP-1:1024,LaMP-2:3200,LaMP-3:1024,LaMP-4:1024,LaMP-5:1024,LaMP-7:1024"  # drawn with `seed`
    retriever: str = "recency"  # recency | bm25 | bm25okapi | random (seeded by `seed`); dense needs an encoder,
    #                             which only evaluate.py loads (dense_encoder=)
    k: int = 8  # retrieved profile items per prompt (0 = none)
    max_prompt_tokens: int = 4096  # prompt budget: the least relevant profile items are dropped to fit; a question
    #                                that does not fit without any is an error (the 8B YAMLs' and PRMU rollouts' value)
    prompt_style: str = "full"  # "full" | "brief" instruction (minitagpr.data.prompts); the one the policy was SFT'd on
    # rollout
    engine: str = "builtin"  # "builtin" (torch sampler) | "vllm" (GPU)
    # vLLM's share of the GPU while it samples (weights + KV cache); training's sharded weights and Adam state stay
    # resident, the rest of PyTorch's cache is emptied before vLLM wakes. More means fewer preempted sequences
    vllm_gpu_memory_utilization: float = 0.3
    builtin_decode: str = "auto"  # the built-in engine's loop: "auto" | "dynamic" | "static" | "graph" (CUDA
    #                               graphs); "auto": graph on CUDA (the engine holds its own unsharded copy,
    #                               build_engine), dynamic on CPUs
    group_size: int = 5  # G: responses sampled per prompt, standardised within the group (>= 2)
    temperature: float = 1.0  # the log-probs of the ratio use the same temperature
    top_p: float = 1.0  # must stay 1: the ratio's pi_old is the untruncated distribution
    max_new_tokens: int = 2048  # response cap in tokens; a response cut here gets R_f = 0 (as the 8B YAMLs and
    #                             PRMU rollouts: Stage 3 without --config cuts where Stage 2 and PRMU's pairs did)
    # optimisation
    prompts_per_step: int = 128  # global batch of prompts; each yields G responses (a multiple of ranks x
    #                              num_minibatches)
    num_minibatches: int = 4  # optimizer steps per pass over the rollout batch (whole groups each); 1 (with
    #                           ppo_epochs=1) makes the ratio exactly 1
    ppo_epochs: int = 1  # passes over each rollout batch
    micro_batch_size: int = 8  # sequences per forward/backward (memory only; never changes the gradient)
    epochs: float = 13.0  # passes over the task mix's prompts: RL steps = int(epochs x (prompts // prompts_per_step))
    lr: float = 1e-6  # peak learning rate (AdamW)
    warmup_steps: int = 0  # in RL steps (each is ppo_epochs x num_minibatches optimizer steps at one lr)
    min_lr_ratio: float = 1.0  # lr at the last RL step, as a share of lr (cosine decay; 1 = constant after warmup)
    weight_decay: float = 0.0  # AdamW decay, on weight matrices only
    grad_clip: float = 1.0  # max global grad norm per optimizer step (0 = no clipping)
    eps_low: float = 3e-4  # GSPO clips the sequence ratio s_i to [1 - eps_low, 1 + eps_high]
    eps_high: float = 4e-4  # upper side of that clip range
    token_level: bool = False  # GSPO-token (per-token ratios, same value); not token-mean normalisation of the loss
    # reward (paper: alpha = beta = 0.8, gamma = 0.2); ablation switches
    alpha: float = 0.8  # weight of (R_v + R_rep)R_f (guided only: the foundation reward has no weights)
    beta: float = 0.8  # weight of R_tag (guided only)
    gamma: float = 0.2  # weight of R_PRMU (guided only); 0: the PRMU is not loaded
    use_tag_reward: bool = True  # false: beta is taken as 0 (ablation)
    use_prmu: bool = True  # false: gamma is taken as 0 and the PRMU is not loaded (ablation)
    # None: score with the table the PRMU checkpoint has (none for a Skywork RM or a PRMU trained without one -- the
    # paper's "w/o UE" row is such a checkpoint); True demands a saved table; False scores a table-trained PRMU
    # without it (inputs it never saw: a diagnostic, not a paper row)
    prmu_user_table: bool | None = None
    # tokens per PRMU input (prompt without its system turn + response); longer ones lose their oldest tokens, counted
    # per step as prmu_inputs_cut. 0: the max_len the PRMU was trained with (train_prmu records it in the export's
    # minitagpr.json), 4096 for a checkpoint that records none (a hub RM)
    prmu_max_len: int = 0
    rouge_variant: str = "rougeL"  # rouge1 | rouge2 | rougeL: R_v of the generation tasks (LaMP-4, 5, 7)
    # R_v of LaMP-1/2/3: exact match of the stripped answer, as tagpr-method.md defines it and the official evaluation
    # scores it; true = the project's per-task normalisation (answers.normalize: "4 stars" -> "4"), more lenient than
    # the evaluation, so RL would be rewarded for answers the table scores 0
    normalize_answers: bool = False
    # plumbing
    seed: int = 0  # the task-mix draw and the random retriever; prompt order and sampling use it as is (guided) or
    #                as 2 * seed + 1 (exploratory)
    save_every: int = 50  # checkpoint every N RL steps and at the last; 0 = no checkpoints
    keep_last: int = 2  # how many of the newest checkpoints out_dir/checkpoints keeps (0 = all)
    resume: bool = True  # continue from the latest checkpoint in out_dir/checkpoints; false deletes them
    max_steps: int = 0  # > 0 caps the number of RL steps (smoke tests, demo)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward: less memory, slower
    mixed_precision: str = "auto"  # auto | bf16 | fp32; auto: bf16 compute + fp32 reduce on GPU, fp32 on CPU

    @property
    def uses_prmu(self) -> bool:
        """Whether this run reads a PRMU: guided RL with R_PRMU on (the ablations without it load none)."""
        return self.stage == "guided" and self.use_prmu and self.gamma != 0.0

    def __post_init__(self):
        if self.stage not in ("guided", "exploratory"):
            raise ValueError(f"stage must be 'guided' or 'exploratory', got {self.stage!r}")
        for key in ("prompts_per_step", "micro_batch_size", "max_new_tokens", "max_prompt_tokens"):
            check_at_least(key, getattr(self, key), 1)
        check_at_least("k", self.k, 0)  # k = 0: prompts without profile items
        check_at_least("prmu_max_len", self.prmu_max_len, 0)
        for key in ("save_every", "keep_last", "max_steps"):
            check_at_least(key, getattr(self, key), 0)
        # the seed enters torch generators as seed * 100_003 + epoch and 2 * seed + 1 (stage_seed): a negative one
        # gave Stage 3 Stage 2's sequence (2 * -1 + 1 = -1), a huge one overflowed at step 0 after the models loaded
        check_number("seed", self.seed, 0, 2**31, hi_open=True)
        check_number("epochs", self.epochs, 0.0, lo_open=True)  # 0 or less used to train one step
        check_number("eps_low", self.eps_low, 0.0, 1.0, hi_open=True)  # the band's low side 1 - eps_low stays > 0
        check_number("eps_high", self.eps_high, 0.0)
        for key in ("alpha", "beta", "gamma"):
            check_number(key, getattr(self, key))
        check_optimizer(self, lrs=("lr",), grad_clip="grad_clip", warmup="warmup_steps", warmup_max=math.inf)
        check_choice("split", self.split, lamp.SPLITS)
        check_choice("part", self.part, lamp.GOLD_PARTS)
        check_choice("retriever", self.retriever, ENCODERLESS)  # dense needs an encoder: evaluate.py only
        check_choice("prompt_style", self.prompt_style, STYLES)
        check_choice("mixed_precision", self.mixed_precision, ("auto", "bf16", "fp32"))
        check_choice("rouge_variant", self.rouge_variant, ROUGE_VARIANTS)
        parse_task_mix(self.tasks)  # the mix's syntax and task names now, not after the model has loaded
        check_fraction("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization)
        if self.engine not in ("builtin", "vllm"):
            raise ValueError(f"engine must be 'builtin' or 'vllm', got {self.engine!r}")
        if self.builtin_decode not in BuiltinEngine.DECODE_MODES:
            raise ValueError(f"builtin_decode must be one of {BuiltinEngine.DECODE_MODES}, got {self.builtin_decode!r}")
        if self.group_size < 2:
            raise ValueError("group_size (G) must be >= 2: group advantages need at least two responses")
        if self.num_minibatches < 1 or self.ppo_epochs < 1:
            raise ValueError("num_minibatches and ppo_epochs must be >= 1")
        if self.prompts_per_step % self.num_minibatches:
            raise ValueError(f"prompts_per_step={self.prompts_per_step} is not a multiple of num_minibatches="
                             f"{self.num_minibatches}: every mini-batch holds the same number of whole groups")
        if self.top_p != 1.0 or not self.temperature > 0:
            raise ValueError(f"top_p={self.top_p}, temperature={self.temperature}: GSPO's ratio needs the log-probs "
                             "of the distribution that sampled; use top_p=1 and temperature > 0")


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
    """"LaMP-1:1024,LaMP-2:0" -> [("LaMP-1", 1024), ("LaMP-2", 0)] (count 0 = all); ValueError naming `tasks`."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        try:
            task = lamp.canonical_task(name.strip())
        except ValueError as e:
            raise ValueError(f"tasks: {e}") from None
        if lamp.task_spec(task).folder is None:  # e.g. PGraphRAG: its files are not laid out as a LaMP download
            raise ValueError(f"tasks: {task} is not a LaMP task; RL draws its prompts from a LaMP-format data_root= "
                             f"({', '.join(t for t in lamp.TASKS if lamp.task_spec(t).folder)})")
        if not count.strip().isdigit() and count.strip():
            raise ValueError(f"tasks: cannot parse the count of {part!r}; expected 'task:count' with a count >= 0 "
                             f"(0 = all)")
        if any(task == t for t, _ in out):  # two draws of one task would repeat prompts and split its metrics
            raise ValueError(f"tasks: {task} appears more than once in the task mix {spec!r}")
        out.append((task, int(count or 0)))
    if not out:
        raise ValueError("tasks: the task mix is empty")
    return out


def load_prompts(cfg: RLConfig, tokenizer: Tokenizer, *, part: str | None = None) -> list[Prompt]:
    """The task mix: `count` examples per task drawn with a fixed seed, rendered as chat prompts (thinking on)."""
    if not cfg.data_root:
        raise ConfigError("data_root= is required: the LaMP-format root (a LaMP download or a demo world folder)")
    retriever = get_retriever(cfg.retriever, seed=cfg.seed)
    prompts = []
    for task, count in parse_task_mix(cfg.tasks):
        qpath, opath = lamp.split_files(cfg.data_root, task, cfg.split, part or cfg.part)
        examples = lamp.load_questions(qpath, task)
        _, golds = lamp.load_outputs(opath, task)  # checks the file's task and that every gold is an answer
        lamp.check_no_extra_golds(golds, examples, opath, qpath)  # the whole file, before the task mix samples
        if count > len(examples):  # the mix asks for more than the file has: say so, the run uses them all
            D.log(f"[{cfg.stage}] note: the task mix asks for {count} {task} examples but {qpath} has "
                  f"{len(examples)}; using all {len(examples)}")
        examples = task_mix_sample(examples, count, cfg.seed, task)
        for ex in examples:
            if ex.id not in golds:
                raise lamp.DataError(f"{opath}: no gold output for question id {ex.id!r} of {qpath}")
            try:
                messages = build_messages(ex, retriever.select(ex, cfg.k), tokenizer, cfg.max_prompt_tokens,
                                          style=cfg.prompt_style)
            except PromptTooLongError as e:  # it names the example; the file is known here
                raise PromptTooLongError(f"{qpath}: {e}") from None
            ids = tokenizer.apply_chat(messages, add_generation_prompt=True, enable_thinking=True)
            prompts.append(Prompt(ex.id, task, ex.user, messages, ids, golds[ex.id]))
    return prompts


def prompts_digest(prompts: list[Prompt]) -> str:
    """A fingerprint of the task mix as this run trains on it: every prompt's id, task, user, gold and token ids, in
    order. A resume compares it with the checkpoint's, since data_root and policy (whose tokenizer renders the
    prompts) are paths a resume may change."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.task, p.user, p.gold]).encode())
        h.update(array("q", [len(p.ids), *p.ids]).tobytes())
    return h.hexdigest()[:16]


def weights_digest(module: torch.nn.Module, users=None, sample: int = 4096) -> str:
    """A cheap fingerprint of a model's weights (and of its user-id map, if any): each tensor's name, shape and
    first `sample` values. A fine-tuned or another model differs there; hashing every weight of a 0.6B PRMU would
    cost each rank seconds at every start."""
    h = hashlib.sha256(json.dumps(list(getattr(users, "users", []))).encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1)[:sample].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def task_mix_sample(examples: list, count: int, seed: int, task: str) -> list:
    """The `count` examples of `task` the mix draws (all of them if count is 0 or at least their number): a seeded
    sample, the same for every rank and every run with this seed (other recipes draw the RL users with it)."""
    if count and count < len(examples):
        return random.Random(f"{seed}/{task}").sample(examples, count)
    return list(examples)


def prompts_for_step(step: int, num_prompts: int, per_step: int, seed: int) -> list[int]:
    """Global prompt indices of RL step `step`: epoch e visits a seeded permutation; a step never mixes epochs
    (the tail of an epoch shorter than a batch is dropped), so resume at any step -- epoch boundaries included --
    continues exactly (the verl #7401 trap)."""
    steps_per_epoch = num_prompts // per_step
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return order[within * per_step:(within + 1) * per_step]


# ----------------------------------------------------------------------------------------------- 2. rollout
def rollout(engine, prompts: list[Prompt], cfg: RLConfig, tokenizer: Tokenizer, seed: int, prompt_offset: int = 0):
    """G completions per prompt, flattened prompt-major: response j of prompt i sits at i*G + j. Sample j of
    local prompt i is seeded from (seed, prompt_offset + i, j): its global position in the step, so the samples do
    not depend on the number of ranks."""
    groups = engine.generate([p.ids for p in prompts], n=cfg.group_size, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                             stop_token_ids=tokenizer.stop_ids,
                             seed=[sample_base(seed, prompt_offset + i) for i in range(len(prompts))])
    return [c for g in groups for c in g]


# ----------------------------------------------------------------------------------------------- 3. rewards
def reward_mix(cfg: RLConfig) -> tuple[str, float, float, float]:
    """(mix, alpha, beta, gamma) the stage's rewards are mixed with: guided RL the composite reward, its tag and PRMU
    weights 0 when the ablations switch those terms off; exploratory RL R_foundation (the weights unused)."""
    if cfg.stage != "guided":
        return "foundation", cfg.alpha, cfg.beta, cfg.gamma
    return "composite", cfg.alpha, cfg.beta if cfg.use_tag_reward else 0.0, cfg.gamma if cfg.use_prmu else 0.0


def compute_rewards(prompts: list[Prompt], completions, cfg: RLConfig, prmu=None):
    """RewardParts per response (every component kept for logging) and the rewards r_i as a (B*G,) fp64 tensor."""
    G = cfg.group_size
    tasks = [p.task for p in prompts for _ in range(G)]
    golds = [p.gold for p in prompts for _ in range(G)]
    texts = [c.text for c in completions]
    prmu_scores = None
    if cfg.uses_prmu:
        prmu_scores = prmu.score([p.user for p in prompts for _ in range(G)],
                                 [p.messages for p in prompts for _ in range(G)], texts)
    mix, alpha, beta, gamma = reward_mix(cfg)
    bad = [i for i, x in enumerate(prmu_scores or []) if not math.isfinite(x)]
    for i in bad:  # scored as 0 here; the reward itself is set non-finite below so that every rank stops
        prmu_scores[i] = 0.0
    parts = score_batch(tasks, texts, golds, prmu=prmu_scores, mix=mix, alpha=alpha, beta=beta, gamma=gamma,
                        rouge_variant=cfg.rouge_variant, normalize_answers=cfg.normalize_answers,
                        finished=[c.finish_reason == "stop" for c in completions])  # cut by the limit: R_f = 0
    rewards = torch.tensor([p.total for p in parts], dtype=torch.float64)  # (B*G,)
    rewards[bad] = math.nan  # a non-finite PRMU score
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


def response_ends(mask: torch.Tensor) -> torch.Tensor:
    """(N,) one past each row's last response target in the (N, T) mask; 0 for an empty response."""
    return (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(dim=1)


def used_columns(mask: torch.Tensor) -> int:
    """How many leading columns of these rows anything depends on: up to the last response target. Rows are right
    padded and attention is causal, so the columns after it change no log-prob and no gradient; each micro-batch
    is cut there instead of at the global batch's longest row. At least 1 (a micro-batch of empty responses)."""
    return max(1, int(response_ends(mask).max()))


@torch.no_grad()
def sequence_logprobs(model, input_ids, targets, batches: list[torch.Tensor], temperature: float = 1.0):
    """log pi_old(y_t | ...) of every target token, no grad: the behaviour log-probs, computed over the very same
    micro-batches, cut to the very same columns, as the update will use (so with bf16 the first on-policy ratio is
    exactly 1, not batch-shape noise). (N, T) fp32, 0 off-mask."""
    out = torch.zeros(targets.shape, dtype=torch.float32)
    for rows in batches:
        t = used_columns(targets[rows] != -100)
        logp, _ = model(input_ids[rows, :t], targets=targets[rows, :t], temperature=temperature)  # (b, t)
        out[rows, :t] = logp.float().cpu()
    return out


# ----------------------------------------------------------------------------------------------- 5. GSPO update
def minibatch_index(num_prompts: int, G: int, num_minibatches: int) -> list[torch.Tensor]:
    """Row indices of each mini-batch: the G responses of local prompt i go to mini-batch i mod M (whole groups).
    Each rank holds a multiple of M prompts starting at a global index that is a multiple of M, so global prompt p
    lands in mini-batch p mod M whatever the number of ranks: 1 and N processes take identical optimizer steps, and
    every rank runs the same number of forwards (FSDP's collectives need that)."""
    prompt = torch.arange(num_prompts * G) // G  # (N,) local prompt of each prompt-major row
    return [torch.nonzero(prompt % num_minibatches == m).flatten() for m in range(num_minibatches)]


def micro_batches(rows: torch.Tensor, size: int, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Consecutive chunks of `size` rows. Given the (N, T) response mask, the rows are first ordered by where their
    response ends (longest first, ties in row order), so each chunk, cut at its own last used column, carries
    little padding. Micro-batching never changes the gradient (summed), only the work and the memory."""
    if mask is not None:
        rows = rows[torch.sort(-response_ends(mask[rows]), stable=True).indices.cpu()]
    return [rows[s:s + size] for s in range(0, len(rows), size)]


def micro_batch_plan(mask: torch.Tensor, num_prompts: int, cfg: RLConfig) -> list[list[torch.Tensor]]:
    """Per mini-batch, its micro-batches' rows: the one plan both the old-log-prob pass and the update follow."""
    return [micro_batches(rows, cfg.micro_batch_size, mask)
            for rows in minibatch_index(num_prompts, cfg.group_size, cfg.num_minibatches)]


def gspo_update(model, optimizer, batch: dict, cfg: RLConfig, device) -> dict:
    """ppo_epochs x num_minibatches optimizer steps over this rank's share of the rollout batch. Each mini-batch's
    loss is -sum_i objective_i / (global count of non-empty sequences in the mini-batch): gradients are summed over
    ranks and micro-batches, so every sequence weighs the same whatever its length and wherever it runs.
    Returns the loss metrics as global sums (key -> (weighted sum, weight)) for `reduce_train_metrics`."""
    plan = micro_batch_plan(batch["mask"], batch["input_ids"].shape[0] // cfg.group_size, cfg)
    sums: dict[str, list[float]] = {}
    for _ in range(cfg.ppo_epochs):
        for chunks in plan:
            nonempty = batch["mask"][torch.cat(chunks)].any(dim=1).sum().to(torch.float64)
            n_global = int(D.all_reduce_sum(nonempty.to(device)).item())
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for mrows in chunks:
                t = used_columns(batch["mask"][mrows])  # the columns this micro-batch needs
                mb = {k: (v[mrows, :t] if v.dim() == 2 else v[mrows]).to(device) for k, v in batch.items()}
                logp, _ = model(mb["input_ids"], targets=mb["targets"], temperature=cfg.temperature)  # (b, t)
                loss, m = gspo_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], eps_low=cfg.eps_low,
                                    eps_high=cfg.eps_high, token_level=cfg.token_level,
                                    num_sequences=max(n_global, 1))
                loss.backward()  # a NaN here is caught below, on every rank at once (no rank left in a collective)
                loss_sum += loss.detach().double()
                m.pop("num_sequences_norm", None)  # the mini-batch's N, logged once per optimizer step below
                _accumulate(sums, m)
            loss_global = D.all_reduce_sum(loss_sum).item()  # the mini-batch's loss over all ranks
            grad_norm = clip_grad_norm(model, cfg.grad_clip)  # global norm: the same on every rank
            if not (math.isfinite(loss_global) and math.isfinite(grad_norm)):
                raise NonFiniteError(f"non-finite GSPO loss ({loss_global}) or gradient norm ({grad_norm})")
            optimizer.step()
            per_step = {"loss": loss_global, "grad_norm": grad_norm, "num_sequences_norm": float(max(n_global, 1))}
            _accumulate(sums, per_step, weight=1.0 / D.world().world_size)  # means over the optimizer steps
    for k in _COUNT_KEYS:  # every epoch visits the same sequences: report the batch's counts once
        if k in sums:
            sums[k][0] /= cfg.ppo_epochs
    return sums


# Loss metrics of gspo_loss: counts are summed, min/max reduced, approx_kl averaged over tokens, the rest over
# non-empty sequences -- so the step's values do not depend on how its rows were cut into micro-batches or ranks
# (adv_std is pooled from the first two moments in reduce_train_metrics). The ratio statistics, clip fractions and
# approx_kl pool every optimizer step of the rollout batch, the first one included, whose ratio is exactly 1 by
# construction (as other stacks log them): with M mini-batches and one epoch, 1/M of their weight is on-policy.
# loss, grad_norm and num_sequences_norm (the N each loss was divided by) are means over the optimizer steps.
_COUNT_KEYS = ("num_sequences", "num_tokens", "empty_sequences")
_PER_TOKEN_KEYS = ("approx_kl",)
_POOLED_KEYS = ("adv_std",)


def _accumulate(sums: dict, metrics: dict, weight: float | None = None) -> None:
    w = float(metrics.get("num_sequences", 0.0)) if weight is None else weight
    w_tok = float(metrics.get("num_tokens", 0.0)) if weight is None else weight
    for k, v in metrics.items():
        if k in _POOLED_KEYS:
            continue  # recomputed from the step's moments in reduce_train_metrics
        if k.endswith(("_min", "_max")):
            # An all-empty micro-batch has no ratio to report, but it still enters the key with the neutral element
            # (+inf for a min, -inf for a max): every rank then packs the same keys for reduce_train_metrics's
            # collectives, even a rank whose responses are all empty.
            lo = k.endswith("_min")
            cur = sums.setdefault(k, [math.inf if lo else -math.inf, 1.0])
            if metrics.get("num_sequences", 1.0) > 0:
                cur[0] = (min if lo else max)(cur[0], v)
        elif k in _COUNT_KEYS:
            sums.setdefault(k, [0.0, 1.0])[0] += v
        else:
            acc = sums.setdefault(k, [0.0, 0.0])
            weight_k = w_tok if k in _PER_TOKEN_KEYS else w
            acc[0] += weight_k * v
            acc[1] += weight_k


def reduce_train_metrics(sums: dict, device) -> dict:
    """Global values of `gspo_update`'s sums, prefixed `gspo/` (weighted means, summed counts, min/max)."""
    keys = sorted(sums)
    packed = torch.tensor([[sums[k][0], sums[k][1]] for k in keys], dtype=torch.float64, device=device)  # (K, 2)
    summed = D.all_reduce_sum(packed.clone())
    out = {}
    for i, k in enumerate(keys):
        if k.endswith(("_min", "_max")):
            t = packed[i, :1].clone()
            if D.world().world_size > 1:
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN if k.endswith("_min")
                                             else torch.distributed.ReduceOp.MAX)
            if math.isfinite(t.item()):  # +-inf: no non-empty sequence on any rank
                out[f"gspo/{k}"] = t.item()
        elif k in _COUNT_KEYS:
            out[f"gspo/{k}"] = summed[i, 0].item()
        else:
            out[f"gspo/{k}"] = (summed[i, 0] / summed[i, 1]).item() if summed[i, 1] > 0 else 0.0
    if "gspo/adv_sq_mean" in out:  # the std over all non-empty sequences of the step, not a mean of per-batch stds
        mean_sq = out.pop("gspo/adv_sq_mean")
        out["gspo/adv_std"] = math.sqrt(max(mean_sq - out["gspo/adv_mean"] ** 2, 0.0))
    return out


def sampler_logp_gap(completions, old_logp: torch.Tensor, mask: torch.Tensor, device) -> dict:
    """How far the engine's log-probs of the sampled tokens lie from the policy's own (`old_logp`, the ratio's
    denominator, which the loop recomputes and never takes from the engine): mean and max |difference| over every
    rank's response tokens. Both models hold the same weights after a sync, so this is the numerics gap between
    sampler and trainer (vLLM's kernels and bf16 against the FSDP forward; fp32 against fp32 on the built-in CPU
    engine, ~1e-6): the samples come from a slightly different policy than the one the loss treats as pi_old."""
    old_logp, mask = old_logp.cpu(), mask.cpu()  # (N, T) each; sequence_logprobs returns pi_old on the CPU
    sampler = torch.zeros_like(old_logp)
    for n, c in enumerate(completions):  # a Completion holds one log-prob per token (checked when it is made)
        if c.token_ids:  # make_sequences put this row's response targets, in order, where mask[n] is true
            sampler[n, mask[n]] = torch.tensor(c.logprobs, dtype=sampler.dtype)
    gap = (sampler - old_logp).abs()[mask].double()
    # the collectives run on every rank, an empty one included (the reductions' tensors live on the group's device)
    summed = D.all_reduce_sum(torch.tensor([gap.sum().item(), gap.numel()], dtype=torch.float64, device=device))
    top = D.all_reduce_max(torch.tensor([gap.max().item() if gap.numel() else 0.0], dtype=torch.float64,
                                        device=device))
    if summed[1] == 0:  # every response of the step empty
        return {}
    return {"rollout/logp_gap_mean": (summed[0] / summed[1]).item(), "rollout/logp_gap_max": top.item()}


# ----------------------------------------------------------------------------------------------- 6. weight sync
def sync_to_engine(model, engine) -> float:
    """Collective: stream each parameter's full tensor under its HF name into the engine; returns seconds."""
    t0 = time.perf_counter()
    if getattr(engine, "sleep_level", 0) > 0 and torch.cuda.is_available():
        torch.cuda.empty_cache()  # vLLM slept through training; hand it what PyTorch cached there before it wakes

    def full_tensors():
        for name, p in model.named_parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p  # all-gather of the FSDP2 shards
            yield name, t.detach()
    engine.sync_weights(full_tensors())
    D.wait_for_device(next(model.parameters()).device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- 7. the loop
def gather_rows(values: torch.Tensor, device) -> torch.Tensor:
    """All ranks' (n, C) rows, rank-major (every rank holds the same n): global statistics, not means of means."""
    values = values.to(device).contiguous()  # NCCL gathers contiguous tensors only (a transposed one raises)
    if D.world().world_size == 1:
        return values.cpu()
    out = [torch.empty_like(values) for _ in range(D.world().world_size)]
    torch.distributed.all_gather(out, values)
    return torch.cat(out).cpu()


def batch_digest(prompts: list[Prompt], completions, group_size: int, device) -> str:
    """A fingerprint of what a step trained on: sha256 over the global batch's (example id, every sampled token
    id), prompt by prompt in global order, whatever the number of ranks. Two runs (or a run and its resumed copy)
    logging the same digest at a step sampled the same prompts and the same tokens there."""
    local = []
    for i, p in enumerate(prompts):
        h = hashlib.sha256(p.id.encode())
        for c in completions[i * group_size:(i + 1) * group_size]:  # length, then the ids as 8-byte integers
            h.update(array("q", [len(c.token_ids), *c.token_ids]).tobytes())
        local.append(int.from_bytes(h.digest()[:7], "big"))  # 56 bits: fits an int64 for the gather
    rows = gather_rows(torch.tensor(local, dtype=torch.int64).view(-1, 1), device)  # (B_global, 1) rank-major
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


def reward_term_columns(parts, cfg: RLConfig) -> tuple[list[str], list[tuple[float, ...]]]:
    """(term names, one column per term) of rewards.reward_terms under the stage's mix: what each response's reward
    is made of. A term whose weight is 0 (an ablation) is left out: always 0, its correlation with the advantages
    means nothing. The names come from the config alone, so every rank sends the same columns."""
    mix, alpha, beta, gamma = reward_mix(cfg)
    weights = {"foundation": alpha, "tag": beta, "prmu": gamma} if mix == "composite" else {}
    names = [n for n in TERMS[mix] if weights.get(n, 1.0) != 0]
    rows = [reward_terms(p, mix, alpha, beta, gamma) for p in parts]
    return names, [tuple(r[n] for r in rows) for n in names]


def reward_metrics(parts, rewards: torch.Tensor, completions, cfg: RLConfig, device, tasks=None) -> dict:
    """Global per-step means of every reward component, pass rates, lengths and the group-advantage statistics,
    computed on all ranks' responses gathered (groups never straddle ranks, so gathering keeps them whole).
    With `tasks` (one task name per response) also the reward and R_v means per task of the mix that this step
    sampled ("reward_mean/LaMP-4", "r_v_mean/LaMP-4"): the curves that show which tasks RL moves.
    A new per-response quantity is one more entry in `columns`, then a key in `m` below."""
    names = [t for t, _ in parse_task_mix(cfg.tasks)]
    columns = {  # one value per response of this rank
        "reward": rewards.tolist(),
        "r_v": [p.r_v for p in parts],
        "r_f": [p.r_f for p in parts],
        "r_rep": [p.r_rep for p in parts],
        "r_tag": [p.r_tag for p in parts],
        "r_prmu": [p.r_prmu if p.r_prmu is not None else math.nan for p in parts],
        **{f"term/{name}": list(values) for name, values in zip(*reward_term_columns(parts, cfg))},
        "length": [float(len(c.token_ids)) for c in completions],
        "cut": [float(c.finish_reason == "length") for c in completions],
        "task": [float(names.index(t)) if t in names else -1.0 for t in tasks] if tasks is not None
        else [-1.0] * len(parts),
    }
    gathered = gather_rows(torch.tensor(list(columns.values()), dtype=torch.float64).T, device)  # (N_global, C)
    col = dict(zip(columns, gathered.T))  # name -> (N_global,) over all ranks
    m = {"reward_mean": col["reward"].mean().item(), "r_v_mean": col["r_v"].mean().item(),
         "format_pass_rate": (col["r_f"] == 1.0).double().mean().item(), "r_rep_mean": col["r_rep"].mean().item(),
         "tag_pass_rate": (col["r_tag"] == 0.0).double().mean().item(),
         "response_len_mean": col["length"].mean().item(), "truncated_share": col["cut"].mean().item()}
    if not torch.isnan(col["r_prmu"]).all():
        m["r_prmu_mean"] = col["r_prmu"].mean().item()
    m.update({f"group/{k}": v for k, v in group_advantage_metrics(col["reward"], cfg.group_size).items()})
    terms = {k.split("/", 1)[1]: v for k, v in col.items() if k.startswith("term/")}
    terms["r_v"] = col["r_v"]  # R_v alone (inside the foundation term, beside R_rep and R_f): what task metrics follow
    m.update({f"group/adv_corr/{k}": v
              for k, v in advantage_correlations(col["reward"], terms, cfg.group_size).items()})
    for i, name in enumerate(names):
        rows = col["task"] == i
        if bool(rows.any()):
            m[f"reward_mean/{name}"] = col["reward"][rows].mean().item()
            m[f"r_v_mean/{name}"] = col["r_v"][rows].mean().item()
            m[f"responses/{name}"] = int(rows.sum())  # what a mean over steps weighs the two above by
    return m


def pass_flops(model, input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[float, float]:
    """(non-pad tokens, FLOPs of one training pass: forward + backward) of a batch of sequences (N, T) on this
    rank. Each sequence's own length sets its attention cost (the batch's padded width would overstate it), and the
    fused log-prob kernel runs the LM head on the response tokens (`mask`) only."""
    lengths = (input_ids != pad_id).sum(dim=1)  # (N,) non-pad tokens per sequence
    return float(lengths.sum()), model.document_flops(lengths) + float(mask.sum()) * model.head_flops_per_token()


def check_finite(rewards: torch.Tensor, prompts: list[Prompt], G: int, step: int, stage: str, device) -> None:
    """Stop every rank together (a rank raising alone would leave the others waiting in a collective)."""
    bad = [i for i, r in enumerate(rewards.tolist()) if not math.isfinite(r)]
    n_bad = D.all_reduce_sum(torch.tensor(float(len(bad)), dtype=torch.float64, device=device)).item()
    if n_bad:
        where = f"responses {bad[:5]} (prompt ids {[prompts[i // G].id for i in bad[:5]]}) on this rank" if bad \
            else "another rank"
        raise NonFiniteError(f"[{stage}] step {step}: {int(n_bad)} non-finite reward(s), {where}; stopping")


def build_engine(cfg: RLConfig, tokenizer: Tokenizer, info):
    from minitagpr.model import load_pretrained
    if cfg.engine == "vllm":
        from minitagpr.rollout.vllm_engine import VLLMEngine
        # sleep level 2 between rollouts frees the weights too (the policy's are synced in before each generate)
        return VLLMEngine(cfg.policy, tokenizer, sleep_level=2, seed=cfg.seed,
                          max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,  # a full prompt + response
                          gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    # the engine keeps its own full (unsharded) copy: FSDP2 shards never leave the policy; weights sync after steps
    model = load_pretrained(cfg.policy, dtype=torch.float32, device=info.device).eval()
    return BuiltinEngine(model, tokenizer, decode=cfg.builtin_decode)


# Settings a resumed run may change (plumbing); any other difference from the checkpoint's config is an error.
# policy, prmu and data_root are paths (a run may move): what they hold is checked instead (_check_resumed_inputs).
# prmu_max_len may change on resume as long as the length it resolves to stays the one the run scored with (checked
# against the checkpoint's prmu_max_len_used, not here). engine and builtin_decode may change so that a run can
# finish on another machine (no vLLM there), but the steps after the switch sample other tokens for the same seeds:
# exact resume holds only for an unchanged engine (the step log's batch_digest shows where they part)
RESUMABLE_KEYS = {"out_dir", "resume", "save_every", "keep_last", "max_steps", "engine", "builtin_decode",
                   "vllm_gpu_memory_utilization", "micro_batch_size", "activation_checkpointing", "policy", "prmu",
                   "data_root", "prmu_max_len"}


def _check_resumed_config(saved: dict, cfg: RLConfig, path: Path) -> None:
    """Compare the RL settings only: a recipe's own keys (e.g. the demo driver's exploratory_steps) do not change
    this stage's steps."""
    rl_only = {f.name: saved[f.name] for f in fields(RLConfig) if f.name in saved}
    decays = cfg.min_lr_ratio != 1.0 and rl_only.get("max_steps", cfg.max_steps) != cfg.max_steps
    # max_steps sets where the lr decay ends: with a decaying lr the resumed steps would get other lrs
    check_resumed_config(rl_only, cfg, RESUMABLE_KEYS, path, also_changed=["max_steps"] if decays else [],
                         fields_of=RLConfig)


def _check_resumed_inputs(state: dict, path: Path, prompts_now: str, prmu_now: str | None, cfg: RLConfig) -> None:
    """The paths a resume may change (data_root, policy, prmu) must still hold what the run started with: the same
    prompts and the same PRMU weights, else the resumed steps would train on other data or another reward. Checkpoints
    written before the fingerprints were recorded are not checked."""
    saved = state.get("prompts_digest")
    if saved is not None and saved != prompts_now:
        raise ConfigError(f"{path}: the task mix differs from the one this run started with (prompt fingerprint "
                          f"{prompts_now}, the checkpoint's {saved}): data_root={cfg.data_root} or the policy's "
                          f"tokenizer ({cfg.policy}) now gives other prompts; point them at the run's own data and "
                          f"policy, or start over with resume=false")
    saved = state.get("prmu_digest")
    if saved is not None and prmu_now is not None and saved != prmu_now:
        raise ConfigError(f"{path}: prmu={cfg.prmu} holds other weights or users than the PRMU this run scored with "
                          f"(fingerprint {prmu_now}, the checkpoint's {saved}); point prmu= at that PRMU, or start "
                          f"over with resume=false")


def stage_seed(cfg: RLConfig) -> int:
    """The seed of a stage's prompt order and sampling: the run seed for guided RL, 2 * seed + 1 for exploratory
    RL, so that Stage 3 run with Stage 2's seed does not replay Stage 2's prompt order and random draws step for
    step. Both inputs are in the saved config, which a resume must match (`_check_resumed_config`)."""
    return cfg.seed if cfg.stage == "guided" else 2 * cfg.seed + 1


def rollout_seed(seed: int, step: int) -> int:
    """The engine's base seed of RL step `step`: a function of the run seed and the step only, so a resumed step
    samples exactly what it sampled before."""
    return (seed * 1_000_003 + step) & (2**62 - 1)


def train(cfg: RLConfig) -> Path:
    """Run (or resume) one RL stage; returns the HF export folder `<out_dir>/export`."""
    if cfg.engine == "vllm":
        engines.require_vllm(cfg.temperature)
    info = D.init_distributed()
    peak, peak_note = peak_flops(info.device)  # a bad MINITAGPR_PEAK_TFLOPS is named before anything loads
    out = Path(cfg.out_dir)
    export_dir, ckpt_dir = out / "export", out / "checkpoints"
    torch.manual_seed(cfg.seed)
    tokenizer = Tokenizer.from_dir(resolve_checkpoint(cfg.policy))  # a missing policy is named as a checkpoint
    if mismatch := style_mismatch(resolve_checkpoint(cfg.policy), cfg.prompt_style):
        raise ConfigError(f"policy {cfg.policy}: {mismatch}")
    if cfg.uses_prmu:
        resolve_checkpoint(cfg.prmu)  # a wrong path fails now, not after an 8B policy has loaded

    # 1. data: the same prompt list on every rank; each step takes a global batch and splits it by rank
    prompts = load_prompts(cfg, tokenizer)
    mix_digest = prompts_digest(prompts)  # checked on resume, saved with every checkpoint
    per_rank, rem = divmod(cfg.prompts_per_step, info.world_size)
    if rem or per_rank % cfg.num_minibatches:
        unit = info.world_size * cfg.num_minibatches  # valid values are its multiples
        near = sorted({max(unit, cfg.prompts_per_step // unit * unit), (cfg.prompts_per_step // unit + 1) * unit})
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} must split into {info.world_size} rank(s) x a "
                          f"multiple of num_minibatches={cfg.num_minibatches} prompts: a multiple of {unit}, e.g. "
                          f"prompts_per_step={' or '.join(map(str, near))}")
    if len(prompts) < cfg.prompts_per_step:
        raise ConfigError(f"the task mix has {len(prompts)} prompts, fewer than prompts_per_step="
                          f"{cfg.prompts_per_step}")
    max_position = Qwen3Config.from_json(resolve_checkpoint(cfg.policy) / "config.json").max_position_embeddings
    longest = max(prompts, key=lambda p: len(p.ids))
    if len(longest.ids) + cfg.max_new_tokens > max_position:  # now, not at the step that draws it (on one rank)
        raise ConfigError(f"prompt {longest.id!r} ({longest.task}) has {len(longest.ids)} tokens; with max_new_tokens="
                          f"{cfg.max_new_tokens} it exceeds the policy's max_position_embeddings={max_position} "
                          f"({cfg.policy}); lower max_prompt_tokens or max_new_tokens")
    steps_per_epoch = len(prompts) // cfg.prompts_per_step
    total_steps = max(1, int(cfg.epochs * steps_per_epoch + 1e-9))  # 0.57 x 100 is 56.99999...: 57 steps
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    if note := warmup_note(cfg.warmup_steps, total_steps):
        D.log(f"[{cfg.stage}] note: {note}")

    # 2. policy (FSDP2), optimizer, rollout engine, reward model
    model = D.build_sharded_causal_lm(cfg.policy, info, D.device_mesh(info), mp_mode=cfg.mixed_precision,
                                      activation_checkpointing=cfg.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.lr, weight_decay=cfg.weight_decay)
    engine = build_engine(cfg, tokenizer, info)
    prmu, prmu_len_source, prmu_digest = None, "", None
    if cfg.uses_prmu:
        from minitagpr.model.reward import DEFAULT_MAX_LEN, PRMUScorer, trained_max_len
        # prmu_user_table=true on a checkpoint without a table fails in the loader (CheckpointError, naming it)
        prmu = PRMUScorer.from_pretrained(cfg.prmu, device=info.device, use_user_table=cfg.prmu_user_table,
                                          max_len=cfg.prmu_max_len)
        prmu_len_source = ("prmu_max_len" if cfg.prmu_max_len else "as it was trained" if trained_max_len(
            resolve_checkpoint(cfg.prmu)) else f"the export records no max_len: the default {DEFAULT_MAX_LEN}")
        D.log(f"[{cfg.stage}] PRMU {cfg.prmu}: inputs up to {prmu.max_len} tokens ({prmu_len_source})")
        prmu_digest = weights_digest(prmu.model, prmu.model.users)

    # 3. resume: weights, optimizer, step; the engine then starts from the checkpoint's weights
    start = 0
    latest = D.checkpoint_to_resume(ckpt_dir, cfg.resume, f"[{cfg.stage}]")
    if latest is not None:
        reads = prmu.max_len if prmu is not None else None  # plain values: the closure reads nothing deleted later
        policy_config = model.config

        def check(state: dict) -> None:  # before any tensor loads (D.load_checkpoint)
            _check_resumed_config(state.get("config", {}), cfg, latest)
            # checkpoints written before the length was recorded scored with the fixed DEFAULT_MAX_LEN
            scored = (state.get("prmu_max_len_used") or DEFAULT_MAX_LEN) if reads is not None else None
            if reads is not None and scored != reads:  # e.g. a PRMU re-exported since, with another max_len
                raise ConfigError(f"{latest}: this run scored R_PRMU inputs up to {scored} tokens, {cfg.prmu} now "
                                  f"reads {reads} ({prmu_len_source}); pass prmu_max_len={scored} to go on "
                                  f"as it started")
            _check_resumed_inputs(state, latest, mix_digest, prmu_digest, cfg)
            D.check_resumed_model(state, policy_config, latest, "policy")
            D.check_resume_step(state["step"], total_steps, latest)
        state = D.load_checkpoint(latest, model, optimizer, check=check)
        start = state["step"]
        sync_to_engine(model, engine)
        D.log(f"[{cfg.stage}] resumed from {latest} at step {start}")
    # the RL settings of this run (a driver's own keys left out, so the file runs as a config); on_main: a failed
    # write stops every rank
    D.on_main(lambda: save_config(RLConfig(**{f.name: getattr(cfg, f.name) for f in fields(RLConfig)}),
                                  out / "config.yaml"))
    log = JsonlLog(out / "metrics.jsonl", enabled=info.is_main, resume_step=start + 1 if start else None)
    progress = Progress(total_steps, start, enabled=info.is_main, stream=sys.stdout, every_s=0.0,
                        prefix=f"[{cfg.stage}] ")
    if cfg.num_minibatches == 1 and cfg.ppo_epochs == 1:
        D.log(f"[{cfg.stage}] note: one mini-batch and one epoch per rollout batch -> the GSPO ratio is exactly 1 "
              "and clipping never acts (the update is the plain policy gradient); raise num_minibatches or "
              "ppo_epochs for the clip range to matter")
    gap_comparable = cfg.engine != "vllm" or cfg.temperature == 1.0  # vLLM reports log-probs at T = 1
    if not gap_comparable:
        D.log(f"[{cfg.stage}] note: vLLM reports log-probs at temperature 1, so at temperature={cfg.temperature} "
              "the sampler-vs-policy gap (rollout/logp_gap_*) is not logged")
    D.log(f"[{cfg.stage}] {len(prompts)} prompts, {steps_per_epoch} steps/epoch, {total_steps} steps, "
          f"G={cfg.group_size}, {cfg.prompts_per_step} prompts/step on {info.world_size} rank(s); MFU peak: "
          f"{peak_note}")

    # 4. the loop
    for step in range(start, total_steps):
        D.fault_point("step", step)  # crash-recovery tests kill the run here
        t0 = time.perf_counter()
        idx = prompts_for_step(step, len(prompts), cfg.prompts_per_step, stage_seed(cfg))
        offset = info.rank * per_rank
        mine = [prompts[i] for i in idx[offset:offset + per_rank]]

        # on_every_rank: the phase ends with the slowest rank's samples (reward_s is then rewards only, on every
        # rank), and a rank that fails here (out of memory, a bad request) stops the others instead of leaving them
        # in the next collective
        completions = D.on_every_rank(functools.partial(rollout, engine, mine, cfg, tokenizer,
                                                        seed=rollout_seed(stage_seed(cfg), step), prompt_offset=offset))
        engine.sleep()  # vLLM frees its GPU memory for training; sync_to_engine wakes the weights (no-op: built-in)
        t_rollout = time.perf_counter() - t0

        parts, rewards = D.on_every_rank(functools.partial(compute_rewards, mine, completions, cfg, prmu))  # (B*G,)
        check_finite(rewards, mine, cfg.group_size, step + 1, cfg.stage, info.device)  # 1-based, as the log
        advantages = group_advantages(rewards, cfg.group_size)  # (B*G,)

        input_ids, targets, mask = make_sequences(mine, completions, cfg.group_size, tokenizer.pad_id)
        t1 = time.perf_counter()
        t_reward = t1 - t0 - t_rollout  # rewards (with the PRMU forward), advantages, sequences
        model.train()
        rows = [r for chunks in micro_batch_plan(mask, len(mine), cfg) for r in chunks]  # the update's micro-batches
        old_logp = sequence_logprobs(model, input_ids.to(info.device), targets.to(info.device), rows,
                                     cfg.temperature)  # (N, T) log pi_old
        batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "old_logp": old_logp,
                 "advantages": advantages.float()}
        set_lr(optimizer, lr_at(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
        try:
            sums = gspo_update(model, optimizer, batch, cfg, info.device)
        except NonFiniteError as e:
            raise NonFiniteError(f"[{cfg.stage}] step {step + 1}: {e}; stopping (last checkpoint kept)") from None
        D.wait_for_device(info.device)  # the last optimizer step is still queued on a GPU
        t_train = time.perf_counter() - t1
        t_sync = sync_to_engine(model, engine) if step + 1 < total_steps else 0.0

        row = {"step": step + 1, **reward_metrics(parts, rewards, completions, cfg, info.device,
                                                  tasks=[p.task for p in mine for _ in range(cfg.group_size)]),
               **reduce_train_metrics(sums, info.device),
               **(sampler_logp_gap(completions, old_logp, mask, info.device) if gap_comparable else {}),
               "batch_digest": batch_digest(mine, completions, cfg.group_size, info.device)}
        # every rank's tokens and FLOPs: the old-log-prob forward (1/3 of a training pass) + ppo_epochs passes
        tokens, flops = D.all_reduce_sum(torch.tensor(pass_flops(model, input_ids, mask, tokenizer.pad_id),
                                                      dtype=torch.float64, device=info.device)).tolist()
        flops *= 1 / 3 + cfg.ppo_epochs
        elapsed = time.perf_counter() - t0
        row.update(lr=optimizer.param_groups[0]["lr"], rollout_s=t_rollout, reward_s=t_reward, train_s=t_train,
                   step_s=elapsed, mfu=flops / t_train / (info.world_size * peak),
                   # tokens through the update's ppo_epochs passes (prompt + response, every rank) per second of
                   # the train phase, which also runs the old-log-prob forward
                   train_tokens_per_s=tokens * cfg.ppo_epochs / t_train)
        if prmu is not None:  # responses (all ranks) whose PRMU input lost its oldest tokens to prmu_max_len
            row["prmu_inputs_cut"] = D.all_reduce_sum(torch.tensor(float(prmu.last_cut), device=info.device)).item()
        if step + 1 < total_steps:  # the last step has nothing to sync: no 0 to pull an average down
            row["sync_s"] = t_sync
        log.write(row)
        progress.update(step, reward=row["reward_mean"], fmt=row["format_pass_rate"], tag=row["tag_pass_rate"],
                        len=row["response_len_mean"], clip=row.get("gspo/clip_frac_low", 0.0)
                        + row.get("gspo/clip_frac_high", 0.0))
        # every save_every steps, and the last step (so a kill during the export resumes straight into it; one
        # more full checkpoint write per run)
        if cfg.save_every > 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == total_steps):
            D.save_checkpoint(ckpt_dir, step + 1, model, optimizer,
                              {"stage": cfg.stage, "config": asdict(cfg),
                               "prmu_max_len_used": prmu.max_len if prmu is not None else None,
                               "prompts_digest": mix_digest, "prmu_digest": prmu_digest,
                               "model_config": D.model_record(model.config)},
                              keep_last=cfg.keep_last)

    # 5. export (config, safetensors, tokenizer files) that load_pretrained, transformers and vLLM load
    D.export_hf(model, export_dir, tokenizer_dir=resolve_checkpoint(cfg.policy),  # a hub id: its cached folder
                training={"prompt_style": cfg.prompt_style})
    D.log(f"[{cfg.stage}] exported {export_dir}")
    del model, optimizer, engine, prmu  # the engine's and the PRMU's GPU memory too (vLLM may load next)
    D.release_memory()  # a caller's next stage loads in this process (the demo runs both RL stages in one)
    return export_dir
