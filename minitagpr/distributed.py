"""Everything that knows about more than one process: process group, FSDP2 sharding, DCP checkpoints, HF export.

The model, losses and rewards never import torch.distributed; a recipe builds a model, hands it to `shard_model`
(or uses `build_sharded_causal_lm`), and calls `save_checkpoint` / `load_checkpoint` / `export_hf` from here.

Conventions every recipe relies on:
- Gradients are *summed* across ranks (FSDP's divide factor is 1): each loss must already be divided by its global
  normaliser (e.g. the all-reduced count of valid tokens of the step), see minitagpr/train/loss.py.
- Parameters are fp32 master weights on every device; on GPU, FSDP computes in bf16 and reduces in fp32.
- A checkpoint is a folder `step_XXXXXX` written as `step_XXXXXX.tmp` and renamed when complete; no folder is ever
  deleted under its final name, so a crash at any point of a save leaves a complete checkpoint as the latest (the
  protocol is spelled out above `save_checkpoint`).
"""
from __future__ import annotations

import gc
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from minitagpr.config import ConfigError
from minitagpr.model.checkpoint import fsync_path

T = TypeVar("T")

CKPT_PATTERN = re.compile(r"^step_(\d{6,})$")
TMP_PATTERN = re.compile(r"^step_(\d{6,})\.tmp$")  # being written, or a save that died
ASIDE_PATTERN = re.compile(r"^\.step_(\d{6,})\.(old|del)$")  # moved aside by a save, see save_checkpoint
CKPT_LAST_FILES = (".metadata", "state.json")  # DCP writes .metadata when its save is done; state.json is last
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")  # copied into exports when the source has them
FAULT_ENV = "MINITAGPR_FAULT"  # test hook, see fault_point

_we_initialised = False


# ----------------------------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), or
    form a one-process group when there is no such environment. NCCL with one GPU per process when CUDA is
    available, gloo on CPU. Idempotent: an already initialised group (e.g. by a calling recipe) is reused."""
    global _we_initialised
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        check_gpu_per_rank(local_rank, torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"timeout": timedelta(seconds=timeout_s)}
        if use_cuda:
            kwargs["device_id"] = torch.device("cuda", local_rank)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, **kwargs)
        else:  # plain `python recipe.py`: a group of one, no ports needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        _we_initialised = True
    return world()


def check_gpu_per_rank(local_rank: int, gpus: int, local_world_size: int) -> None:
    """One GPU per process: more processes on a node than visible GPUs is a launch mistake (e.g. the README's
    `--nproc_per_node=2` on a one-GPU machine), named here rather than as CUDA's 'invalid device ordinal'."""
    if local_rank >= gpus:
        raise ConfigError(f"torchrun started {local_world_size} processes on this node but {gpus} CUDA device(s) are "
                          f"visible, and each process needs its own GPU: use --nproc_per_node={gpus} (or "
                          f"CUDA_VISIBLE_DEVICES= to run on the CPU)")


def world() -> DistInfo:
    """Rank, world size and device of this process (the group must be initialised)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def machine(gpu_name: bool = True) -> dict[str, object]:
    """What a run's numbers depend on beyond its settings: the torch build, the CPU and the vector instruction set
    torch's CPU kernels dispatch to (AVX2 and AVX-512 round differently, so a demo table is reproducible bit for bit
    only on the same kind of machine), the GPUs visible and the number of processes.

    gpu_name=False counts the visible GPUs without asking CUDA for a name (a launcher process that must not
    initialise CUDA while its children use the cards)."""
    import platform
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name() if gpu_name else f"{torch.cuda.device_count()} GPU(s)"
    return {"torch": torch.__version__, "cpu": cpu or platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "gpu": gpu,
            "processes": dist.get_world_size() if dist.is_initialized() else 1}


def describe_machine(m: dict) -> str:
    """One line for logs: 'AMD EPYC (AVX2), no GPU, torch 2.13.0+cpu, 2 processes'."""
    n = m.get("processes")
    return (f"{m.get('cpu')} ({m.get('cpu_capability')}), {m.get('gpu') or 'no GPU'}, torch {m.get('torch')}, "
            f"{n} process{'es' * (n != 1)}")


def destroy_distributed() -> None:
    """Tear down the process group, but only if `init_distributed` created it.

    On a normal exit every rank first meets at a barrier, so no rank tears its connections down while another is
    still using the group (see `end_process` for how a recipe then leaves). While an exception is propagating
    (this is called from `finally` blocks) there is no barrier: the other ranks may never arrive, and torchrun
    stops them anyway."""
    global _we_initialised
    if _we_initialised and dist.is_initialized():
        if sys.exc_info()[0] is None and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _we_initialised = False


def end_process(code: int = 0) -> NoReturn:
    """End a recipe process that has finished its work: flush stdout/stderr, then `os._exit(code)`, skipping the
    interpreter's finalization.

    Why: after `destroy_process_group` torch keeps the gloo process group alive when FSDP2 has used it (its refcount
    stays at 13 from internal references, and its three threads -- two `pt_gloo_runloop`, one `gloo_tcp_loop` --
    keep running; measured with torch 2.13, see tests/test_distributed.py). They are only torn down during
    interpreter finalization. Twice a rank died after all of its results had been written, with SIGABRT and
    "terminate called without an active exception" (a C++ thread object destroyed while its thread still ran):
    at the end of a demo run, and in a CI run of the resume test; torchrun then reported the job as failed. It did
    not reproduce in 26 local kill-and-resume cycles of that test's run (52 torchrun runs, 20 cycles on a loaded
    CPU) nor in 30 synthetic FSDP2 teardowns, so this removes the place where it happened, not a proven cause.
    Call it only from a recipe's `__main__` block, after `main` returned: every file the recipes write is closed
    and renamed into place by then (checkpoints, exports, metrics.jsonl, evaluation files)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*parts, file=None) -> None:
    """print on rank 0 only, flushed (torchrun interleaves the ranks' streams)."""
    if is_main():
        print(*parts, file=file or sys.stdout, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks (in place, also returned); the identity without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max of `t` over all ranks (in place, also returned); the identity without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (small picklable objects only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to_main(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others (picklable objects; the whole list is held
    in rank 0's memory). Without a process group: [obj]."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    box = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, box, dst=0)
    return box


def on_main(fn: Callable[[], T]) -> T | None:
    """Collective. `fn()` on rank 0 only; then every rank learns whether it raised, and the others raise an error of
    the same type and message. Without this a rank 0 that stopped (a mis-shaped tensor, a full disk) left the others
    waiting in the next collective: torchrun stops them, a launcher that does not (srun) let them hold their GPUs
    until the process group's timeout. Returns fn's result on rank 0, None on the others (a result of None on
    rank 0 too: `on_main(...) or default` gives the others the default)."""
    result, failure = None, None
    if is_main():
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 -- re-raised below, after the other ranks heard of it
            failure = err
    shared = broadcast_object(_portable(failure))
    if failure is not None:
        raise failure
    if shared is not None:
        raise shared
    return result


def on_every_rank(fn: Callable[[], T]) -> T:
    """Collective. `fn()` on every rank; then every rank learns whether any raised: a rank that failed raises its own
    error, the others the lowest failing rank's (its type and message). For work whose failure only some ranks meet
    (a bad record in one rank's share, a full disk under one rank's files): the others would otherwise go on to the
    next collective and wait there. Each rank's result is its own."""
    result, failure = None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 -- re-raised below, after the other ranks heard of it
        failure = err
    failures = [_portable(failure)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, _portable(failure))
    if failure is not None:
        raise failure
    first = next((f for f in failures if f is not None), None)
    if first is not None:
        raise first
    return result


def _portable(failure: Exception | None) -> Exception | None:
    """An error that can travel to the other ranks: itself when it survives pickling (its type and fields, e.g. an
    OSError's filename), else a RuntimeError with its type and message (e.g. an error holding an open file)."""
    if failure is None:
        return None
    try:
        return pickle.loads(pickle.dumps(failure))
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(failure).__name__}: {failure}")


def wait_for_device(device) -> None:
    """Block until the device's queued work is done: CUDA runs kernels and collectives asynchronously, so a phase
    timed on the host alone would leave its tail to whichever phase syncs next."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- FSDP2
def release_memory() -> None:
    """Free what a finished stage left behind before the next one loads. An FSDP2 module and its hooks' state
    reference each other, so `del model` alone frees nothing (its sharded weights and optimizer state stay on the
    device) until the cycle collector runs; collect now, then return the cached CUDA blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_mesh(info: DistInfo) -> DeviceMesh:
    """A 1-D data-parallel mesh over all ranks (FSDP shards every parameter over it)."""
    return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))


def mixed_precision(device: torch.device, mode: str = "auto") -> MixedPrecisionPolicy | None:
    """bf16 compute with fp32 gradient reduction on GPU ("auto" or "bf16"); plain fp32 on CPU or with "fp32"."""
    if mode not in ("auto", "bf16", "fp32"):
        raise ValueError(f"mixed_precision must be auto, bf16 or fp32, got {mode!r}")
    if mode == "fp32" or (mode == "auto" and device.type != "cuda"):
        return None
    # cast_forward_inputs=False: FSDP would otherwise round every float argument of the forward to bf16, e.g. SFT's
    # token weights -1/N (a different bf16 rounding error in the gradient's scale each step). Nothing needs the
    # cast: the blocks get bf16 activations from the bf16 embedding, and cos/sin and masks follow their dtype.
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks (HF layout `model.layers`) of a causal LM or a reward model."""
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `model.layers` ModuleList to shard block by block")
    return blocks


def enable_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in the backward pass instead of storing them (non-reentrant).

    The block's forward is wrapped in place, so parameter names (and thus checkpoints) are unchanged."""
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():  # decoding and no-grad scoring: nothing to save, run plainly
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


# FSDP2's setters for a plain sum over ranks (pytorch PR #155915, mid-2025; the kernels' CUDA matmuls with out_dtype
# are as new). MIN_TORCH is the oldest release the project has run on (GPU checks in bench/RESULTS.md: 2.11.0+cu130;
# CPU: 2.13.0); pyproject's floor says the same
FSDP2_SUM_METHODS = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms")
MIN_TORCH = "2.11"


def shard_model(model: nn.Module, mesh: DeviceMesh, mp: MixedPrecisionPolicy | None = None,
                activation_checkpointing: bool = False) -> nn.Module:
    """FSDP2: `fully_shard` each decoder block, then the root (embedding, final norm, head -- a tied head is the
    embedding parameter, so it lives once in the root group). Works on a model built on the meta device."""
    missing = [m for m in FSDP2_SUM_METHODS if not hasattr(FSDPModule, m)]
    if missing:  # an older torch: say so here, not as an AttributeError after the model is half sharded
        raise ConfigError(f"this torch ({torch.__version__}) has no FSDPModule.{', '.join(missing)}: minitagpr sums "
                          f"gradients over ranks with them and needs torch >= {MIN_TORCH}")
    blocks = decoder_blocks(model)
    if activation_checkpointing:
        enable_activation_checkpointing(blocks)
    kwargs = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum over ranks: losses carry their global normaliser themselves
            m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return model


def materialize_and_load(model: nn.Module, full_state_dict: dict[str, torch.Tensor], device: torch.device) -> None:
    """Allocate a sharded meta-device model on `device` and fill it from a full state dict held by rank 0 only
    (other ranks pass {}); each tensor is broadcast and every rank keeps its shard."""
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty re-creates parameters; re-tie the head to the embedding
    set_model_state_dict(model, full_state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def build_sharded_causal_lm(path: str | os.PathLike, info: DistInfo, mesh: DeviceMesh, *, mp_mode: str = "auto",
                            activation_checkpointing: bool = False) -> nn.Module:
    """Meta-device Qwen3ForCausalLM -> FSDP2 shards -> weights of the HF checkpoint at `path` (read on rank 0)."""
    from minitagpr.model import Qwen3Config, Qwen3ForCausalLM, load_pretrained
    from minitagpr.model.checkpoint import check_causal_lm, resolve_checkpoint

    folder = resolve_checkpoint(path)
    config = Qwen3Config.from_json(folder / "config.json")
    check_causal_lm(folder)  # on every rank: none waits in a broadcast for a rank 0 that refused the folder
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    shard_model(model, mesh, mixed_precision(info.device, mp_mode), activation_checkpointing)
    # fp32 master weights whatever the file stores; only rank 0 reads the file (others receive broadcasts)
    full = on_main(lambda: load_pretrained(folder, dtype=torch.float32).state_dict()) or {}
    materialize_and_load(model, full, info.device)
    del full
    return model


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:06d}"


def missing_last_files(path: str | os.PathLike) -> list[str]:
    """The files written last by `save_checkpoint` that `path` lacks: [] for a complete checkpoint."""
    return [name for name in CKPT_LAST_FILES if not (Path(path) / name).is_file()]


def _scan_checkpoints(ckpt_dir: Path) -> tuple[dict[int, Path], list[str]]:
    """{step: complete checkpoint folder} and a note for every checkpoint-like folder that is not complete.

    A step is its `step_XXXXXX` folder or, when that name is missing because a re-save of the step was killed between
    its two renames, `.step_XXXXXX.old` (complete: it was renamed away whole)."""
    steps, olds, notes = {}, {}, []
    if not ckpt_dir.is_dir():
        return steps, notes
    for p in sorted(ckpt_dir.iterdir()):
        if not p.is_dir():
            continue
        if m := CKPT_PATTERN.match(p.name):
            if missing := missing_last_files(p):
                notes.append(f"{p} (incomplete: no {', '.join(missing)})")
            else:
                steps[int(m.group(1))] = p
        elif (m := ASIDE_PATTERN.match(p.name)) and m.group(2) == "old":
            olds[int(m.group(1))] = p
        elif TMP_PATTERN.match(p.name):
            notes.append(f"{p} (a save that did not finish)")
    for step, p in olds.items():
        if not checkpoint_path(ckpt_dir, step).exists() and not missing_last_files(p):
            steps[step] = p
    return dict(sorted(steps.items())), notes


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with every file of CKPT_LAST_FILES, never *.tmp), oldest first."""
    steps, _ = _scan_checkpoints(Path(ckpt_dir))
    return list(steps.values())


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder, renamed to `<name>.stale` first: a kill mid-delete never leaves a half-deleted folder under
    its own name (a checkpoint whose last files survived but not all its shards would look complete)."""
    path = Path(path)
    gone = path.with_name(path.name + ".stale")
    shutil.rmtree(gone, ignore_errors=True)
    if path.exists():
        os.replace(path, gone)
        shutil.rmtree(gone)


def checkpoint_to_resume(ckpt_dir: str | os.PathLike, resume: bool, tag: str) -> Path | None:
    """Collective. resume=True: the newest complete checkpoint (or None). resume=False: None, after rank 0 deleted
    an earlier run's checkpoints -- a later crash-and-restart must not continue that run, and keep_last must not
    prune the new run's checkpoints in their favour."""
    ckpt_dir = Path(ckpt_dir)
    if resume:  # rank 0 chooses: ranks on several nodes may see a shared folder at different moments
        return broadcast_object(on_main(lambda: latest_checkpoint(ckpt_dir)))

    def remove() -> None:
        existed = ckpt_dir.exists()
        remove_dir(ckpt_dir)  # also what a killed earlier removal left aside
        if existed:
            log(f"{tag} resume=false: removed the earlier run's checkpoints in {ckpt_dir}")
    on_main(remove)
    return None


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None. A folder that is not complete is never chosen, but it is named in
    the log (rank 0), so a run that resumes from an older step, or starts from step 0, says why."""
    steps, notes = _scan_checkpoints(Path(ckpt_dir))
    for note in notes:
        log(f"checkpoints: skipped {note}", file=sys.stderr)
    if notes and not steps:
        log(f"checkpoints: no complete checkpoint in {ckpt_dir}, nothing to resume from", file=sys.stderr)
    return list(steps.values())[-1] if steps else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fault_point(where: str, step: int) -> None:
    """Test hook for crash-recovery tests: with MINITAGPR_FAULT=f"{where}:{step}" in the environment, every rank
    SIGKILLs itself here (no cleanup, as a node failure would). Points: "save" (every rank's shards and RNG file are
    written; state.json is not yet, so the folder is not complete) and "step" (the start of a training step)."""
    if os.environ.get(FAULT_ENV) == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# On disk (one run per ckpt_dir; rank 0 makes every rename and deletion):
# 1. every rank writes its DCP shards (DCP adds .metadata) and RNG state into step_XXXXXX.tmp; after a barrier
#    rank 0 writes state.json, the last file: a folder is complete when it holds both files of CKPT_LAST_FILES;
# 2. rank 0 renames step_XXXXXX.tmp -> step_XXXXXX. A step saved again is first renamed to .step_XXXXXX.old and
#    deleted once the new folder holds the name; a pruned checkpoint is renamed to .step_XXXXXX.del, then deleted.
# So no folder under a final name is ever half-written or half-deleted. list_checkpoints takes a complete .old
# folder whose step_XXXXXX is missing (killed between the two renames) for that step, and the next save tidies up.
def _aside(ckpt_dir: Path, step: int, kind: str) -> Path:
    return ckpt_dir / f".step_{step:06d}.{kind}"


def _tidy_checkpoints(ckpt_dir: Path) -> None:
    """Rank 0, before a save: finish what a killed save left. An .old folder whose step_XXXXXX is missing is renamed
    back (it is the complete checkpoint of that step); every other .old, .del and step_XXXXXX.tmp is deleted."""
    steps, _ = _scan_checkpoints(ckpt_dir)
    for step, p in steps.items():
        if p != checkpoint_path(ckpt_dir, step):  # a complete .old standing in for its step
            os.replace(p, checkpoint_path(ckpt_dir, step))
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else ():
        if ASIDE_PATTERN.match(p.name) or TMP_PATTERN.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync: a file that a later rename makes part of a complete checkpoint is on disk, not just cached."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _DropRecords(logging.Filter):
    """Drops log records emitted from files under `where` whose message holds one of `phrases`."""

    def __init__(self, where: str, phrases: tuple[str, ...]):
        super().__init__()
        self.where, self.phrases = where, phrases

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.where in record.pathname.replace(os.sep, "/")
                    and any(p in record.getMessage() for p in self.phrases))


def _dcp_failure(err: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (`err` itself when it is not one)."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))
        err = err[0] if isinstance(err, tuple) else getattr(err, "exc", err)  # (exception, its frames)
    return err


def _files_at_fault(err: BaseException) -> bool:
    """Whether a rank's failure inside DCP's load can be the checkpoint files' (missing, damaged, of another shape):
    not when that rank ran out of memory, lost a peer or got Ctrl-C, and the checkpoint may be fine."""
    return isinstance(err, Exception) and not isinstance(err, (torch.OutOfMemoryError, MemoryError, dist.DistError))


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep_last: int = 2) -> Path:
    """Collective. Sharded DCP save of model + optimizer, per-rank RNG states, and `state` (a JSON-able dict: step,
    data position, config echo...) into step_XXXXXX.tmp, renamed to step_XXXXXX when every rank has written;
    then all but the newest `keep_last` checkpoints are deleted (keep_last <= 0 keeps all). See the protocol above."""
    info = world()
    ckpt_dir = Path(ckpt_dir)
    final = checkpoint_path(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")

    def prepare() -> None:
        _tidy_checkpoints(ckpt_dir)  # debris of an earlier crash, this step's .tmp included
        tmp.mkdir(parents=True)
    on_main(prepare)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))  # fsyncs its files
    except CheckpointException as e:  # a BaseException wrapping each rank's failure: a full disk is the user's
        first = _dcp_failure(e)
        if isinstance(first, OSError):
            raise first from None
        raise
    rng = io.BytesIO()
    torch.save(_rng_state(), rng)
    # a rank whose write fails (its disk full) stops the others too, which would wait in the barrier below
    on_every_rank(lambda: write_synced(tmp / f"rng_rank{info.rank:05d}.pt", rng.getvalue()))
    fault_point("save", step)
    barrier()  # every rank's files are written

    def commit() -> None:
        payload = dict(state, step=step, world_size=info.world_size)
        write_synced(tmp / "state.json", json.dumps(payload, indent=2).encode())  # last: the folder is complete
        fsync_path(tmp)  # its entries too
        old = None
        if final.exists():  # re-saving a step (e.g. the final save after a resume at that step)
            old = _aside(ckpt_dir, step, "old")
            os.replace(final, old)  # moved aside, not deleted, until the new folder holds the name
        os.replace(tmp, final)
        fsync_path(ckpt_dir)  # the new name is durable before anything older goes
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep_last > 0:
            steps, _ = _scan_checkpoints(ckpt_dir)
            for s in list(steps)[:-keep_last]:
                doomed = _aside(ckpt_dir, s, "del")
                os.replace(steps[s], doomed)  # a half-deleted folder never keeps a final name
                shutil.rmtree(doomed, ignore_errors=True)
    on_main(commit)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    check: Callable[[dict], None] | None = None) -> dict:
    """Collective. Restore model (+ optimizer) shards and this rank's RNG state from a checkpoint folder; returns
    the saved `state` dict (with `step`). The world size may differ from the saving run's (DCP reshards); RNG
    states are then left as they are.

    `check(state)` runs on the saved state before any tensor loads: a recipe's resume checks (its config, data and
    model) go there, so a run whose model= or user set changed shape is told what changed, not that the checkpoint
    is damaged (which a shape mismatch in the load would report, with advice to delete good checkpoints).

    Only a failure of the files (missing, damaged, of another shape) is a CheckpointError advising to delete the
    checkpoint; running out of memory, a lost peer (a gloo/NCCL error) or a bug before or after the read raises its
    own error."""
    from minitagpr.model.checkpoint import CheckpointError

    path = Path(path)
    if missing := missing_last_files(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {', '.join(missing)})")

    def unusable(why: str) -> CheckpointError:
        steps, _ = _scan_checkpoints(path.parent)
        named = CKPT_PATTERN.match(path.name)
        older = [p for s, p in steps.items() if named and s < int(named.group(1))]  # in step order
        fix = (f"delete it to resume from {older[-1].name}, the newest complete checkpoint before it (resume=false "
               f"would delete every checkpoint in {path.parent})" if older else "delete it or run with resume=false")
        return CheckpointError(f"{path}: cannot resume from this checkpoint ({why}); {fix}")
    try:
        state = json.loads((path / "state.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise unusable(f"state.json is not valid JSON: {e}") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise unusable(f"state.json needs an object with an integer 'step' >= 0, got step {step!r}")
    if check is not None:  # every rank reads the same state.json, so every rank refuses together
        check(state)
    # outside the try below, as is set_state_dict: their failures (out of memory, a bug) say nothing of the files
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)  # allocates the optimizer's state
        sd = {"model": model_sd, "optim": optim_sd}
    # DCP logs a damaged .metadata twice on the root logger, each with a traceback, before it raises; the error
    # below says it in one line
    quiet = _DropRecords("torch/distributed/checkpoint", ("metadata is not found",))
    logging.getLogger().addFilter(quiet)
    # DCP raises a CheckpointException (a BaseException) holding each rank's failure to plan or read (a damaged
    # shard, a garbage .metadata, a model of another shape than the one saved); an error of its collectives (a lost
    # peer: a DistError, under gloo a plain RuntimeError) is not caught and goes up as it is
    try:
        dcp.load(sd, checkpoint_id=str(path))
    except CheckpointException as e:
        first = _dcp_failure(e)
        if _files_at_fault(first):
            raise unusable(_first_line(first)) from None
        raise first from e  # its own type, for a caller that handles it (e.g. out of memory); e names its rank
    finally:
        logging.getLogger().removeFilter(quiet)
    if optimizer is None:
        set_model_state_dict(model, sd["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng_file = path / f"rng_rank{world().rank:05d}.pt"
    if state.get("world_size") == world().world_size:  # the same ranks: each restores its own RNG state
        # every rank looks for every rank's file, so all of them refuse together (none waits in a collective);
        # without its file a rank would go on from other random draws than the run it resumes
        missing = [f"rng_rank{r:05d}.pt" for r in range(world().world_size)
                   if not (path / f"rng_rank{r:05d}.pt").is_file()]
        if missing:
            raise unusable(f"{', '.join(missing)} missing")

        def restore() -> None:
            try:
                rng = torch.load(rng_file, weights_only=True)
            except Exception as e:
                raise unusable(f"{rng_file.name} is not a saved RNG state: {type(e).__name__}") from None
            _set_rng_state(rng)
        on_every_rank(restore)  # a file only one rank cannot read stops every rank, not that one alone
    return state


def model_record(config) -> dict:
    """What a checkpoint records of the architecture it trained: the model config's fields as JSON values, without
    the dtype the weights were stored in (training holds fp32 masters whatever it is)."""
    from dataclasses import asdict
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if k != "torch_dtype"}))


def check_resumed_model(state: dict, config, path: str | os.PathLike, key: str) -> None:
    """A resume rebuilds the model from the config at `key` (a path it may change): refuse one that differs from
    the run's own config in any field (rope_theta, rms_norm_eps, ...), which same-shaped weights would load into
    without a word. Checkpoints written before the config was recorded are not checked."""
    saved = state.get("model_config")
    if saved is None:
        return
    now = model_record(config)
    diff = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(saved.keys() | now.keys())
            if saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError(f"{path}: {key}= now holds a model config other than the one this run trained "
                          f"({'; '.join(diff)}); point {key}= at the run's own model, or start over with resume=false")


def check_resume_step(step: int, total_steps: int, path: str | os.PathLike) -> None:
    """A resumed run shortened below the checkpoint's step would train nothing and export the longer-trained weights
    as if they were the shorter run's: refuse it."""
    if step > total_steps:
        raise ConfigError(f"{path}: this run already trained {step} steps but is now set to {total_steps} (epochs / "
                          f"max_steps); resuming would export the {step}-step weights as a {total_steps}-step run. "
                          f"Set the length back, or start over with resume=false")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'no message'}"


# ----------------------------------------------------------------------------------------------- HF export
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective. The unsharded fp32 state dict on CPU on rank 0 ({} on the other ranks)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
              dtype: torch.dtype | None = None, save_fn=None, training: dict | None = None) -> Path:
    """Collective. Gather the full weights on rank 0 and write an HF folder (config.json, safetensors, tokenizer
    files) with `save_fn(model, out_dir, state_dict=..., dtype=..., extra_files=...)` -- `save_pretrained` of
    minitagpr.model by default; the reward model passes its own. `training` (JSON) goes in as TRAINING_FILE. The
    folder appears atomically."""
    if save_fn is None:
        from minitagpr.model import save_pretrained as save_fn
    sd = full_state_dict(model)
    out_dir = Path(out_dir)

    def save() -> None:
        extra = {}
        if tokenizer_dir is not None:
            extra = {n: Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()}
        from minitagpr.data.prompts import TRAINING_FILE
        note = out_dir.with_name(f".{out_dir.name}.{TRAINING_FILE}")  # beside the folder, copied in by save_fn
        if training is not None:
            note.write_text(json.dumps(training, indent=1, sort_keys=True), encoding="utf-8")
            extra[TRAINING_FILE] = note
        try:
            save_fn(model, out_dir, state_dict=sd, dtype=dtype, extra_files=extra)
        finally:
            note.unlink(missing_ok=True)
    on_main(save)  # every rank returns once the folder is in place, or raises rank 0's error
    return out_dir
