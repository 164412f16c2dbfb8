"""Stage 1 -- supervised fine-tuning on tagged reasoning chains (../shared/docs/tagpr-method.md "Stage 1 -- SFT").

    torchrun --nproc_per_node=2 recipes/sft.py                                  # the demo (tiny Qwen3, demo chains)
    torchrun --nproc_per_node=8 recipes/sft.py --config recipes/configs/sft_qwen3_8b.yaml data=chains.jsonl
    python recipes/sft.py max_steps=20 lr=3e-4                                  # one process, no torchrun

Loss: cross-entropy of the assistant turn (`<think>` chain `</think>` answer `<|im_end|>`) given the prompt, prompt
tokens masked; the token sum is divided by the global count of target tokens of the optimizer step
(minitagpr/train/loss.py). Outputs in out_dir: config.yaml, metrics.jsonl, metrics.png, checkpoints/step_XXXXXX
(resumed automatically), hf/ (the exported model + tokenizer), eval.json (demo check of the exported model).

`run(cfg)` is importable: recipes/guided_rl.py calls it inside its own torchrun process group.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minitagpr import distributed as D
from minitagpr.cli import run_recipe
from minitagpr.atomic import atomic_write_json
from minitagpr.config import (ConfigError, check_at_least, check_choice, check_number, check_optimizer,
                              check_resumed_config, parse_cli, save_config, to_dict)
from minitagpr.data.lamp import not_a_file
from minitagpr.model.presets import PRESETS
from minitagpr.train import optim as O
from minitagpr.train import sft_data as S
from minitagpr.train.loss import NonFiniteLossError, nll_forward_backward
from minitagpr.train.metrics import JsonlLog, Progress, mfu, peak_flops


@dataclass
class SftConfig:
    # inputs ("" = the demo: a tiny random Qwen3 sized to the demo tokenizer, trained on the demo world's chains)
    model: str = ""  # HF Qwen3 folder or hub id of the base model
    tokenizer: str = ""  # folder with tokenizer.json + tokenizer_config.json; "" = the model folder
    data: str = ""  # SFT JSONL: {"id", "user", "task", "messages", "chain", "answer"} per line
    demo_dir: str = "runs/demo"  # where the demo world and the demo base model are built once and reused
    demo_preset: str = "demo"  # model preset (minitagpr.model.presets) of the demo base model
    out_dir: str = "runs/sft_demo"  # not runs/demo/sft: that is the demo pipeline's stage folder (recipes/guided_rl.py)
    # batches: a row is seq_len tokens holding one document (pack=False) or several packed ones
    seq_len: int = 704  # tokens per row; the demo's longest record (prompt + chain + answer) is 476
    truncate_long: bool = False  # a record longer than seq_len: False = an error naming it; True = cut to seq_len
    #                              (counted; its end -- </think>, answer, <|im_end|> -- is lost)
    drop_long: bool = False  # True: leave records longer than seq_len out, listed in out_dir/dropped_long.json
    pack: bool = False  # False = one document per row, so global_batch counts examples (the paper's convention)
    global_batch: int = 4  # rows per optimizer step, over all ranks
    micro_batch: int = 1  # rows per forward pass per rank; accumulation = global_batch / (micro_batch * world)
    epochs: int = 2  # passes over the training rows (each drops its incomplete last global batch)
    max_steps: int = 0  # > 0: train exactly this many steps (continuing into further epochs if needed)
    # optimizer: AdamW, linear warmup then cosine decay to min_lr_ratio * lr (defaults: the demo's tiny model;
    # the paper's 1e-5 is in configs/sft_qwen3_8b.yaml)
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # lr at the last step, as a share of lr (1 = constant after warmup)
    warmup_ratio: float = 0.05  # share of the run's optimizer steps spent in linear warmup (rounded to whole steps)
    weight_decay: float = 0.0  # AdamW decay, on weight matrices only (norm gains and other 1-D params: none)
    betas: tuple[float, ...] = (0.9, 0.95)  # AdamW (beta1, beta2)
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping, the norm is still logged)
    # system
    seed: int = 0  # data order, the held-out choice and the demo base model's random init
    mixed_precision: str = "auto"  # auto | bf16 | fp32; auto: bf16 compute + fp32 reduce on GPU, fp32 on CPU
    activation_checkpointing: bool = False  # recompute each block's activations in the backward: less memory, slower
    save_every: int = 100  # checkpoint every N steps (the last step is always saved); 0 = only the last
    keep_last: int = 2  # how many of the newest checkpoints out_dir/checkpoints keeps (0 = all)
    resume: bool = True  # continue from the latest checkpoint in out_dir/checkpoints; false deletes them
    export_dtype: str = "float32"  # dtype of the exported HF weights: float32 or bfloat16
    plot: bool = True  # write metrics.png next to metrics.jsonl
    # demo check of the exported model: greedy chains on held-out prompts
    eval_holdout: int = 32  # prompts held out of training (seeded choice; every chain of each) and decoded after
    #                         export; 0 = no check
    eval_max_new_tokens: int = 320  # token cap on each held-out greedy response

    def __post_init__(self):
        for name in ("global_batch", "micro_batch", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_at_least("seq_len", self.seq_len, 2)  # a row predicts its tokens 2..seq_len from the ones before
        check_at_least("eval_holdout", self.eval_holdout, 0)  # 0 = no check; a negative value read as 0
        check_choice("demo_preset", self.demo_preset, PRESETS)  # was a KeyError after the demo world was built
        check_at_least("max_steps", self.max_steps, 0)  # 0 = epochs decide; a negative value read as 0
        for key in ("save_every", "keep_last"):  # 0 has a meaning; a negative value was read as 0 without a word
            check_at_least(key, getattr(self, key), 0)
        check_at_least("eval_max_new_tokens", self.eval_max_new_tokens, 1)  # was refused only after the export
        check_number("seed", self.seed, 0, 2**31, hi_open=True)  # seed x 1,000,003 + epoch must fit a torch seed
        check_optimizer(self, lrs=("lr",), grad_clip="grad_clip", warmup="warmup_ratio", warmup_max=1.0)
        if self.export_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"export_dtype must be float32 or bfloat16, got {self.export_dtype!r}")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"mixed_precision must be auto, bf16 or fp32, got {self.mixed_precision!r}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.truncate_long and self.drop_long:
            raise ValueError("truncate_long=true cuts the records longer than seq_len and drop_long=true leaves them "
                             "out; set one")


# Settings a resumed run may change (paths, logging, checkpoint cadence, memory knobs, the export); any other
# difference from the checkpoint's config is an error (lr, schedule, batch, data shaping, seed...). truncate_long
# and drop_long only decide whether a too-long record stops the run, is cut or is left out: where one is cut or left
# out, the data fingerprint a resume checks differs anyway. The demo's SFT stage stamp keeps both (guided_rl): a
# finished export has no fingerprint check, and one trained on cut records is not one trained without them.
RESUMABLE_KEYS = {"model", "tokenizer", "data", "demo_dir", "out_dir", "micro_batch", "activation_checkpointing",
                  "save_every", "keep_last", "resume", "export_dtype", "plot", "eval_max_new_tokens", "truncate_long",
                  "drop_long"}


def accumulation_steps(cfg: SftConfig, world_size: int) -> int:
    """Micro-batches per rank in one optimizer step; an error unless global_batch splits evenly over the ranks."""
    accum, rem = divmod(cfg.global_batch, cfg.micro_batch * world_size)
    if accum < 1 or rem:
        raise ConfigError(f"global_batch={cfg.global_batch} must be a multiple of micro_batch * world size = "
                          f"{cfg.micro_batch} * {world_size}: "
                          f"{S.batch_split_hint(cfg.global_batch, cfg.micro_batch, world_size)}")
    return accum


def run(cfg: SftConfig) -> Path:
    """Train, checkpoint, export; returns the HF export folder. Works inside an existing process group."""
    # ---- 1. processes -------------------------------------------------------------------------------------------
    info = D.init_distributed()
    peak, peak_note = peak_flops(info.device)  # a bad MINITAGPR_PEAK_TFLOPS is named before anything loads
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    accum = accumulation_steps(cfg, info.world_size)
    D.log(f"[sft] {info.world_size} process(es) on {info.device.type} ({info.backend}); global batch "
          f"{cfg.global_batch} rows = {info.world_size} ranks x {accum} micro-batches x {cfg.micro_batch} rows "
          f"of {cfg.seq_len} tokens")

    # ---- 2. inputs: the given paths, or the demo world + a tiny base model built once ---------------------------
    model_path, tokenizer_dir, data_path = resolve_inputs(cfg, info)
    from minitagpr.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_dir(tokenizer_dir)

    # ---- 3. data: records -> ids with the prompt masked -> packed rows ------------------------------------------
    records = S.read_sft_records(data_path)
    train_records, heldout = split_heldout(records, cfg.eval_holdout, cfg.seed, data_path)
    docs = S.tokenize_records(train_records, tokenizer, data_path)
    S.tokenize_records(heldout, tokenizer, data_path)  # a bad held-out record is named now, not after training
    dropped = []
    if cfg.drop_long:  # the list is written once the run is known to go ahead (step 6)
        docs, dropped = S.drop_long(docs, cfg.seq_len)
        if not docs:
            raise S.DataError(f"{data_path}: all {len(dropped)} training records are longer than "
                              f"seq_len={cfg.seq_len} tokens (drop_long=true left every one out)")
        D.log(f"[sft] drop_long: {len(dropped)} of {len(docs) + len(dropped)} training records are longer than "
              f"seq_len={cfg.seq_len} tokens and left out ({out_dir / 'dropped_long.json'})")
    rows = S.pack_documents(docs, cfg.seq_len, tokenizer.pad_id, pack=cfg.pack, shuffle_seed=cfg.seed,
                            truncate_long=cfg.truncate_long)
    spe = S.steps_per_epoch(rows.num_rows, cfg.global_batch)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * spe
    fill = float((rows.targets != S.IGNORE_INDEX).sum() / rows.lengths.sum())
    D.log(f"[sft] {len(docs)} documents ({len(heldout)} held out) -> {rows.num_rows} rows "
          f"({rows.num_truncated} truncated to seq_len by truncate_long, {fill:.0%} of real tokens are targets); "
          f"{spe} steps/epoch, {total_steps} steps")

    # ---- 4. model: meta-device init -> FSDP2 shards -> weights broadcast from rank 0 ----------------------------
    mesh = D.device_mesh(info)
    model = D.build_sharded_causal_lm(model_path, info, mesh, mp_mode=cfg.mixed_precision,
                                      activation_checkpointing=cfg.activation_checkpointing)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_dir} has {tokenizer.vocab_size} ids but the model {model_path} only "
                          f"{model.config.vocab_size} embedding rows")
    model.train()

    # ---- 5. optimizer and schedule (lr is a function of the step: nothing extra to checkpoint) -----------------
    optimizer = O.build_optimizer(model, cfg.lr, cfg.weight_decay, tuple(cfg.betas))
    warmup = round(cfg.warmup_ratio * total_steps)

    # ---- 6. resume: model, optimizer, RNG and the step (= the data position) --------------------------------------
    ckpt_dir = out_dir / "checkpoints"
    data_sig = {"num_rows": rows.num_rows, "seq_len": cfg.seq_len, "global_batch": cfg.global_batch,
                "seed": cfg.seed, "pack": cfg.pack, "fingerprint": rows.fingerprint()}
    start_step = 0
    latest = D.checkpoint_to_resume(ckpt_dir, cfg.resume, "[sft]")
    if latest is not None:
        model_config = model.config

        def check(state: dict) -> None:  # before any tensor loads (D.load_checkpoint)
            saved = dict(state.get("data") or {})
            saved.setdefault("fingerprint", data_sig["fingerprint"])  # checkpoints from before the fingerprint
            if saved != data_sig:
                raise ConfigError(f"checkpoint {latest} was written for data {state.get('data')} but this run has "
                                  f"{data_sig}; use a fresh out_dir or resume=false")
            # the run's length sets the warmup (a ratio of it) and where the cosine ends: it may change only when
            # neither depends on it
            length = {"epochs", "max_steps"} if cfg.min_lr_ratio == 1.0 and cfg.warmup_ratio == 0 else set()
            check_resumed_config(state.get("config", {}), cfg, RESUMABLE_KEYS | length, latest)
            D.check_resumed_model(state, model_config, latest, "model")
            D.check_resume_step(int(state["step"]), total_steps, latest)
        start_step = int(D.load_checkpoint(latest, model, optimizer, check=check)["step"])
        D.log(f"[sft] resumed from {latest} at step {start_step}")
    def record_run() -> None:  # after the resume checks: a refused resume leaves the run's own record as it was
        save_config(cfg, out_dir / "config.yaml")
        if cfg.drop_long:  # every rank dropped the same records: one list (empty: none too long)
            atomic_write_json(out_dir / "dropped_long.json", [
                {"id": d.id, "where": d.where, "tokens": len(d.ids), "seq_len": cfg.seq_len} for d in dropped])
        # an earlier run's files would describe data or a model this run does not have; eval.json and metrics.png
        # are written again at the end when this run makes them
        for name in ("eval.json", "metrics.png") + (() if cfg.drop_long else ("dropped_long.json",)):
            (out_dir / name).unlink(missing_ok=True)
    D.on_main(record_run)  # its error (a full disk) stops every rank, not rank 0 alone

    # ---- 7. train -------------------------------------------------------------------------------------------------
    # rows carry completed steps (1-based: the step_XXXXXX checkpoint written after them), as PRMU's and RL's do
    log = JsonlLog(out_dir / "metrics.jsonl", enabled=info.is_main, resume_step=start_step + 1 if latest else None)
    progress = Progress(total_steps, start_step, enabled=info.is_main, prefix="[sft] ")
    body_flops = S.row_flops(rows, model.document_flops)  # (R,) per row, no head
    D.log(f"[sft] MFU peak: {peak_note}")
    t_start = time.perf_counter()
    for step in range(start_step, total_steps):
        D.fault_point("step", step)
        t0 = time.perf_counter()
        lr = O.set_lr(optimizer, O.lr_at(step, total_steps, warmup, cfg.min_lr_ratio))
        global_rows = S.rows_for_step(step, rows.num_rows, cfg.global_batch, cfg.seed)
        mbs = [rows.batch(mb, info.device) for mb in
               S.micro_batches(S.rank_slice(global_rows, info.rank, info.world_size), cfg.micro_batch)]
        optimizer.zero_grad(set_to_none=True)
        out = nll_forward_backward(model, mbs, info.device, step + 1)  # 1-based in messages
        grad_norm = O.clip_grad_norm(model, cfg.grad_clip)
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at step {step + 1}; stopping before "
                                     "its optimizer step")  # 1-based, as metrics.jsonl and checkpoints
        optimizer.step()
        D.wait_for_device(info.device)  # the step's queued GPU work is timed in this step, not the next
        dt = time.perf_counter() - t0
        # real tokens of the step's rows over all ranks (a micro-batch also pads its shorter rows: token_slots)
        tokens = int(rows.lengths[global_rows].sum())
        # every rank's rows of the step (the global batch), each document at its own attention length; the
        # fused log-prob kernel runs the head on target tokens only
        step_flops = sum(body_flops[r] for r in global_rows) + out["valid_tokens"] * model.head_flops_per_token()
        record = {"step": step + 1, "epoch": step // spe, "loss": out["loss"], "lr": lr, "grad_norm": grad_norm,
                  "target_tokens": out["valid_tokens"], "tokens": tokens, "token_slots": out["tokens"],
                  "tokens_per_s": tokens / dt,
                  "mfu": mfu(tokens / dt, step_flops / tokens, info.world_size, peak), "step_time_s": dt,
                  "elapsed_s": time.perf_counter() - t_start}
        log.write(record)
        progress.update(step, loss=out["loss"], lr=lr, gnorm=grad_norm)
        done = step + 1
        if done == total_steps or (cfg.save_every > 0 and done % cfg.save_every == 0):
            extra = {"data": data_sig, "config": to_dict(cfg), "model_config": D.model_record(model.config)}
            D.save_checkpoint(ckpt_dir, done, model, optimizer, extra, cfg.keep_last)

    # ---- 8. export: full weights gathered on rank 0 -> HF folder (config, safetensors, tokenizer) -----------------
    export_dir = D.export_hf(model, out_dir / "hf", tokenizer_dir, dtype=getattr(torch, cfg.export_dtype),
                             training=trained_style(records))
    if cfg.plot and (out_dir / "metrics.jsonl").exists():
        from minitagpr.train.plots import plot_metrics
        D.on_main(lambda: plot_metrics(out_dir / "metrics.jsonl", out_dir / "metrics.png",
                                       keys=["loss", "lr", "grad_norm", "tokens_per_s", "mfu"]))
    D.log(f"[sft] exported {export_dir}")
    del model, optimizer
    D.release_memory()  # before the held-out check loads the export (and a caller's next stage)

    # ---- 9. demo check: greedy chains of the exported model on held-out prompts ----------------------------------
    if heldout:
        result = evaluate_chains(export_dir, heldout, cfg.eval_max_new_tokens, info)
        D.on_main(lambda: atomic_write_json(out_dir / "eval.json", result, indent=2))
        D.log(f"[sft] held-out prompts: {result['well_formed']}/{result['n']} well-formed tagged chains "
              f"({result['well_formed_share']:.0%}); answer matches gold {result['answer_match_share']:.0%}")
    D.barrier()
    return export_dir


def resolve_inputs(cfg: SftConfig, info: D.DistInfo) -> tuple[str, Path, Path]:
    """(model path, tokenizer folder, data file): the given ones, or -- with neither model nor data set -- the demo
    world and a tiny base model sized to its tokenizer, built on rank 0 once and reused afterwards."""
    if bool(cfg.model) != bool(cfg.data):
        raise ConfigError("set both model= and data= (or neither, for the demo); got "
                          f"model={cfg.model!r}, data={cfg.data!r}")
    if cfg.model:
        from minitagpr.model.checkpoint import resolve_checkpoint
        model_path, data = cfg.model, Path(cfg.data)
        tokenizer = Path(cfg.tokenizer) if cfg.tokenizer else resolve_checkpoint(cfg.model)
    else:
        demo_dir = Path(cfg.demo_dir)

        def build() -> tuple[str, str, str]:
            world = ensure_demo_world(demo_dir)
            base = ensure_demo_base(cfg, world)
            return str(base), str(world.tokenizer_dir), str(world.sft_chains)
        model_path, tokenizer, data = D.broadcast_object(D.on_main(build))  # a failed build stops every rank
        tokenizer, data = Path(cfg.tokenizer or tokenizer), Path(data)
    if not data.is_file():
        raise S.DataError(f"SFT data file {data}: {not_a_file(data)}")
    if not (tokenizer / "tokenizer.json").is_file():
        raise ConfigError(f"no tokenizer.json in {tokenizer}; set tokenizer=FOLDER")
    return model_path, tokenizer, data


def ensure_demo_base(cfg: SftConfig, world) -> Path:
    """The demo's tiny base model, demo_dir/base_<preset> (rank 0; built when missing, deterministically from the
    preset, `seed` and the world's tokenizer, so a rebuilt one is the one SFT started from). `demo_base.json`
    records the seed it was built with: a base of another seed is refused, never silently trained from (a base
    from before that record is taken as it is)."""
    base = Path(cfg.demo_dir) / f"base_{cfg.demo_preset}"
    record = base / "demo_base.json"
    if (base / "config.json").exists():
        try:
            built = json.loads(record.read_text()).get("seed") if record.exists() else cfg.seed
        except (OSError, ValueError, AttributeError) as err:  # unreadable, not JSON, or not an object
            raise ConfigError(f"{record}: unreadable record of the demo base's seed ({err}); delete {base} to rebuild "
                              "it") from None
        if built != cfg.seed:
            raise ConfigError(f"{base} is the demo base model of seed {built}, this run has seed={cfg.seed}: give "
                              f"another demo_dir= (or delete {base} to rebuild it with seed {cfg.seed})")
        return base
    from minitagpr.model import presets
    presets.make_tiny_checkpoint(base, preset=cfg.demo_preset, seed=cfg.seed, tokenizer_dir=world.tokenizer_dir)
    atomic_write_json(record, {"preset": cfg.demo_preset, "seed": cfg.seed})
    return base


def ensure_demo_world(demo_dir: Path):
    """The demo world under demo_dir/world (built on first use; building is deterministic)."""
    from minitagpr.data import demo_world
    return demo_world.build(demo_dir / "world")


def split_heldout(records: list[S.SftRecord], n: int, seed: int, path) -> tuple[list, list]:
    """Hold out `n` prompts (a seeded choice) for the post-training check: one record each is decoded, and no record
    with a held-out prompt trains (stage 0 keeps up to max_per_instance chains of one prompt: held out one by one,
    its twin trained and the check scored a seen prompt). The rest train, in file order."""
    if n <= 0:
        return records, []
    groups: dict[str, list[int]] = {}  # prompt -> its records, in file order
    for i, r in enumerate(records):
        groups.setdefault(json.dumps(r.messages, sort_keys=True), []).append(i)
    prompts = list(groups.values())
    if n >= len(prompts):
        raise ConfigError(f"eval_holdout={n} leaves no training records of the {len(records)} in {path} "
                          f"({len(prompts)} distinct prompts)")
    order = list(range(len(prompts)))
    random.Random(seed + 17).shuffle(order)
    held = sorted(order[:n])
    left_out = {i for g in held for i in prompts[g]}
    return [r for i, r in enumerate(records) if i not in left_out], [records[prompts[g][0]] for g in held]


@torch.no_grad()
def evaluate_chains(export_dir: Path, heldout: list[S.SftRecord], max_new_tokens: int, info: D.DistInfo) -> dict:
    """Greedy-decode each held-out prompt with the exported model (prompts split over ranks) and count responses
    that pass the format and tag checks of minitagpr.rewards (R_f = 1 and R_tag = 0), plus exact answer matches."""
    mine = heldout[info.rank::info.world_size]
    # a rank that fails to load or decode stops the others here, not in the sum below
    well, match, samples = D.on_every_rank(lambda: _score_share(export_dir, mine, max_new_tokens, info.device))
    counts = D.all_reduce_sum(torch.tensor([well, match, len(mine)], dtype=torch.float64, device=info.device))
    well_all, match_all, n = (int(x) for x in counts.tolist())
    return {"n": n, "well_formed": well_all, "well_formed_share": well_all / max(n, 1),
            "answer_match_share": match_all / max(n, 1), "samples_rank0": samples}


def _score_share(export_dir: Path, mine: list[S.SftRecord], max_new_tokens: int, device) -> tuple[int, int, list]:
    """(well-formed responses, exact answer matches, up to 3 samples) of this rank's held-out prompts."""
    from minitagpr.model import load_pretrained
    from minitagpr.rewards import format_reward, tag_reward
    from minitagpr.rollout.builtin import BuiltinEngine
    from minitagpr.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(export_dir)
    model = load_pretrained(export_dir, dtype=torch.float32, device=device).eval()
    engine = BuiltinEngine(model, tokenizer)
    prompts = [tokenizer.apply_chat(r.messages, add_generation_prompt=True) for r in mine]
    groups = engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                             stop_token_ids=tokenizer.stop_ids) if prompts else []
    well, match, samples = 0, 0, []
    for r, group in zip(mine, groups):
        text = group[0].text
        chain = text.split("<think>", 1)[-1].split("</think>", 1)[0]
        ok = format_reward(text) == 1 and tag_reward(chain) == 0
        answer = text.rsplit("</think>", 1)[-1].strip()
        well += int(ok)
        match += int(answer == r.answer.strip())
        if len(samples) < 3:
            samples.append({"id": r.id, "task": r.task, "well_formed": ok, "response": text})
    return well, match, samples


def trained_style(records) -> dict | None:
    """What the export records about its prompts: the one instruction style every record's system message was
    rendered in (RL and evaluation then refuse another); None when they differ or are hand-written."""
    from minitagpr.data.prompts import style_of
    styles = {style_of(r.task, r.messages) for r in records}
    return {"prompt_style": styles.pop()} if len(styles) == 1 and None not in styles else None


def main(argv: list[str] | None = None) -> None:
    run_recipe("sft", lambda: run(parse_cli(SftConfig, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
    D.end_process()  # skip interpreter finalization (see there)
