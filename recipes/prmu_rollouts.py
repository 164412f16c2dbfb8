"""Sample the policy on training queries with and without the profile: the raw material of PRMU's preference sets.

    python recipes/prmu_rollouts.py policy=runs/sft/hf questions=.../train_questions.json \\
        outputs=.../train_outputs.json out=runs/prmu/rollouts_lamp2.jsonl n=4 limit=1000
    torchrun --nproc_per_node=8 recipes/prmu_rollouts.py ...          # each rank samples its share of the queries

For every query the policy is sampled `n` times from the personalised prompt (k retrieved profile items; mode
"profile") and `n` times from the same prompt without profile items (mode "no_profile"). The output is rollout
JSONL (`minitagpr.data.preferences.RolloutRecord`, one record per query and mode); then

    python -m minitagpr.data.preferences from-rollouts runs/prmu/rollouts_*.jsonl --out-dir runs/prmu/pairs

builds PRP (profile response over bare response) and PQP (higher verifiable reward over lower) pairs from it.

1. config   2. queries + prompts   3. policy + rollout engine   4. sampling   5. write (rank 0 merges the shards)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minitagpr import distributed as D
from minitagpr.cli import run_recipe
from minitagpr.config import check_at_least, check_choice, check_writable_file, parse_cli
from minitagpr.data import lamp, prompts, retrieval
from minitagpr.data.preferences import RolloutRecord, read_rollouts, write_rollouts
from minitagpr.model import load_pretrained
from minitagpr.model.checkpoint import resolve_checkpoint
from minitagpr.rollout import require_vllm
from minitagpr.tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------- 1. config
@dataclass
class RolloutConfig:
    policy: str = ""  # HF folder of the policy (an SFT or RL export, or a base model)
    questions: str = ""  # LaMP-format *_questions.json (training split)
    outputs: str = ""  # the matching *_outputs.json (golds for PQP)
    task: str = ""  # default: the task named in the outputs file
    out: str = ""  # rollout JSONL to write
    tokenizer: str = ""  # default: the policy folder
    n: int = 4  # samples per query and mode
    k: int = 8  # retrieved profile items in "profile" mode
    retriever: str = "recency"
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    limit: int = 0  # use the first `limit` queries (0 = all)
    batch_prompts: int = 8  # prompts per generate() call
    engine: str = "builtin"  # builtin | vllm
    seed: int = 0

    def __post_init__(self):
        for key in ("policy", "questions", "outputs", "out"):
            if not getattr(self, key):
                raise ValueError(f"{key}= is required")
        check_choice("engine", self.engine, ("builtin", "vllm"))
        check_choice("retriever", self.retriever, retrieval.RETRIEVERS)
        for key in ("n", "batch_prompts", "max_new_tokens", "max_prompt_tokens"):
            check_at_least(key, getattr(self, key), 1)
        for key in ("k", "limit"):
            check_at_least(key, getattr(self, key), 0)


def run(cfg: RolloutConfig) -> Path:
    if cfg.engine == "vllm":
        require_vllm()
    info = D.init_distributed()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    check_writable_file(out, "out")  # before any sampling, so no rollout is lost at the end

    # ------------------------------------------------------------------------------------------- 2. queries
    task = lamp.canonical_task(cfg.task or lamp.load_outputs(cfg.outputs)[0])  # default: the file's own task
    _, golds = lamp.load_outputs(cfg.outputs, task)  # checks the file's task and that every gold is an answer
    examples = lamp.load_questions(cfg.questions, task)
    lamp.check_no_extra_golds(golds, examples, cfg.outputs, cfg.questions)  # the whole file, before `limit`
    if cfg.limit:
        examples = examples[: cfg.limit]
    missing = [ex.id for ex in examples if ex.id not in golds]
    if missing:
        raise lamp.DataError(f"{cfg.outputs}: no gold output for question ids {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''} of {cfg.questions}")
    mine = examples[info.rank::info.world_size]  # each rank samples its own share
    tokenizer = Tokenizer.from_dir(cfg.tokenizer or resolve_checkpoint(cfg.policy))
    retriever = retrieval.get_retriever(cfg.retriever, seed=cfg.seed)
    requests = []  # (example, mode, messages)
    for ex in mine:
        with_profile = prompts.build_messages(ex, retriever.select(ex, cfg.k), tokenizer, cfg.max_prompt_tokens)
        bare = prompts.build_messages(ex, [], tokenizer, cfg.max_prompt_tokens)
        requests += [(ex, "profile", with_profile), (ex, "no_profile", bare)]

    # ------------------------------------------------------------------------------------------- 3. engine
    if cfg.engine == "vllm":
        from minitagpr.rollout import VLLMEngine
        engine = VLLMEngine(resolve_checkpoint(cfg.policy), tokenizer,
                            max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens)
    else:
        from minitagpr.rollout import BuiltinEngine
        engine = BuiltinEngine(load_pretrained(cfg.policy, dtype=torch.float32, device=info.device).eval(),
                               tokenizer)

    # ------------------------------------------------------------------------------------------- 4. sampling
    records = []
    stops = [tokenizer.im_end_id, tokenizer.eos_id]
    for start in range(0, len(requests), cfg.batch_prompts):
        batch = requests[start:start + cfg.batch_prompts]
        ids = [tokenizer.apply_chat(msgs, add_generation_prompt=True) for _, _, msgs in batch]
        # a distinct base seed per rank and batch; each sample's own seed derives from it (see rollout.sample_seed)
        groups = engine.generate(ids, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_new_tokens=cfg.max_new_tokens, stop_token_ids=stops,
                                 seed=cfg.seed * 1_000_003 + info.rank * 100_003 + start)
        for (ex, mode, msgs), group in zip(batch, groups):
            records.append(RolloutRecord(id=ex.id, user=ex.user, task=task, mode=mode, prompt=msgs,
                                         gold=golds[ex.id], responses=[c.text for c in group]))
        D.log(f"rollouts: {min(start + cfg.batch_prompts, len(requests))}/{len(requests)} requests on rank 0")

    # ------------------------------------------------------------------------------------------- 5. write
    part = out.with_name(f"{out.name}.rank{info.rank:05d}")
    write_rollouts(part, records)
    D.barrier()
    if info.is_main:
        parts = [out.with_name(f"{out.name}.rank{r:05d}") for r in range(info.world_size)]
        merged = [r for p in parts if p.stat().st_size for r in read_rollouts(p)]  # a rank may have had no queries
        write_rollouts(out, merged)
        for p in parts:
            p.unlink()
        D.log(f"wrote {len(merged)} rollout records ({len(examples)} queries x 2 modes x n={cfg.n}) to {out}")
    D.barrier()
    return out


if __name__ == "__main__":
    run_recipe("prmu_rollouts", lambda: run(parse_cli(RolloutConfig, sys.argv[1:])))
    D.end_process()  # skip interpreter finalization (see there)
