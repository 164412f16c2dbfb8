"""Hugging Face checkpoint I/O for our Qwen3: safetensors only (nothing is ever unpickled), one file or shards.

Loading builds the model on the meta device, checks every tensor name, shape and byte range from the safetensors
headers *before* reading any weight (so one error lists every problem), then materialises the weights shard by
shard, tensor by tensor: peak memory is the model plus one tensor in flight.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from minitagpr.model.qwen3 import CAUSAL_LM, ConfigError, Qwen3Config, Qwen3ForCausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or saved; the message names the folder, files and tensors involved."""


# ----------------------------------------------------------------------------------------------- locating
def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id ("org/name") resolved through huggingface_hub's local cache."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if olds := _siblings(path, "old"):
        raise CheckpointError(f"{path}: no such folder, but {olds[-1].name} beside it holds the export it was "
                              f"replacing (an export was killed between its two renames): export again, or rename "
                              f"that folder to {path.name} to use the previous export")
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder (config.json + *.safetensors), found a file")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name}: no such checkpoint folder (and not a hub id of the form 'org/name')")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_miss:  # not in the cache: try the hub unless told to stay offline
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        if offline:
            raise CheckpointError(f"{name}: not a local folder and not in the Hugging Face cache ({cache}); "
                                  f"HF_HUB_OFFLINE is set, so it cannot be downloaded. Download it on a machine with "
                                  f"access to the hub and copy the folder here.") from cached_miss
        try:
            return Path(snapshot_download(name, allow_patterns=patterns))
        except Exception as e:
            raise CheckpointError(f"{name}: not a local folder, not in the Hugging Face cache ({cache}), and the "
                                  f"hub could not be reached ({type(e).__name__}). Download it where the hub is "
                                  f"reachable and pass the folder.") from None


def _read_header(file: Path, with_size: bool = False):
    """The safetensors JSON header, validated against the file size (a truncated file fails here, by name)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (expected a JSON object, got "
                              f"{type(header).__name__})")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if problem := _entry_problem(info):
            raise CheckpointError(f"{file}: corrupt safetensors header: tensor {name!r}: {problem}")
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated safetensors file (tensors need {8 + n + end} bytes, file has {size})")
    return (n, header) if with_size else header


def _entry_problem(info) -> str | None:
    """What is wrong with one tensor entry of a safetensors header (None: nothing)."""
    def ints(v, n=None):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))

    if not isinstance(info, dict):
        return f"expected an object with dtype, shape and data_offsets, got {info!r:.80}"
    if not isinstance(info.get("dtype"), str):
        return f"field 'dtype': expected a dtype name such as 'BF16', got {info.get('dtype')!r:.80}"
    if not ints(info.get("shape")):
        return f"field 'shape': expected a list of integers >= 0, got {info.get('shape')!r:.80}"
    offsets = info.get("data_offsets")
    if not ints(offsets, 2) or offsets[0] > offsets[1]:
        return f"field 'data_offsets': expected [begin, end] with 0 <= begin <= end, got {offsets!r:.80}"
    return None


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map {tensor name: shard file name} of a sharded checkpoint's index, validated."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (expected a JSON object, got "
                              f"{type(data).__name__})")
    if not isinstance(weight_map := data.get("weight_map"), dict):
        raise CheckpointError(f"{index}: field 'weight_map': expected an object {{tensor name: shard file name}}, "
                              f"got {weight_map!r:.80}")
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard):
            raise CheckpointError(f"{index}: weight_map[{name!r}]: expected the name of a .safetensors file in this "
                                  f"folder, got {shard!r}")
    return weight_map


def _weight_files(folder: Path) -> list[Path]:
    return _weight_files_and_map(folder)[0]


def _weight_files_and_map(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files a load reads, and the index's {tensor name: shard file name} (None for a single file)."""
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = _read_index(index)
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: shards listed in the index are missing: {', '.join(missing)}")
        return files, weight_map
    if (folder / WEIGHTS_NAME).exists():
        return [folder / WEIGHTS_NAME], None
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    hint = f" (found {', '.join(pickles)}: pickled weights are never loaded; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")


def tensor_names(folder: Path) -> set[str]:
    """The tensor names of a safetensors checkpoint folder, from the headers of the files a load would read (the
    index's shards, or the single file), checked as a load checks them (a damaged header or index, a missing shard:
    a CheckpointError naming the file); no tensor is read."""
    return {name for file in _weight_files(Path(folder)) for name in _read_header(file)}


# ----------------------------------------------------------------------------------------------- loading
def load_state_into(module: torch.nn.Module, folder: Path, *, dtype: torch.dtype | None, device,
                    skip: set[str] = frozenset(), rename=None, mixed_dtype: torch.dtype | None = None) -> None:
    """Check every tensor of a checkpoint folder against `module` (on the meta device) and materialise it in place.

    `dtype`: what every tensor is cast to; None keeps the stored dtype when all tensors share one, and otherwise
    casts all to `mixed_dtype` (the config's torch_dtype), else to the first tensor's dtype, as transformers'
    dtype="auto" does (a bf16 matrix meeting an fp32 one fails at the first matmul). `skip`: checkpoint names to
    ignore (e.g. a tied lm_head). `rename(name) -> name | None` maps checkpoint names to module names (None = not
    ours). Raises one CheckpointError naming every missing/unexpected/mis-shaped tensor."""
    expected = {n: tuple(p.shape) for n, p in module.named_parameters(remove_duplicate=True)}
    files, weight_map = _weight_files_and_map(folder)
    where: dict[str, tuple[Path, dict, str]] = {}  # model name -> (file, header entry, checkpoint name)
    unexpected, misshaped, unreadable = [], [], []
    seen: dict[str, Path] = {}  # checkpoint name -> the file it was first found in
    shaped = set()  # model names found, mis-shaped or not (so a mis-shaped one is not also "missing")
    for file in files:
        for ckpt_name, info in _read_header(file).items():
            if ckpt_name in seen:  # which copy a load took would depend on the order of the files
                unreadable.append(f"{ckpt_name}: in both {seen[ckpt_name].name} and {file.name}")
                continue
            seen[ckpt_name] = file
            if weight_map is not None and weight_map.get(ckpt_name) != file.name:
                unreadable.append(f"{ckpt_name}: in {file.name}, but the index puts it in "
                                  f"{weight_map.get(ckpt_name) or 'no file'}")
            name = rename(ckpt_name) if rename else ckpt_name
            if ckpt_name in skip or name in skip:
                continue
            if name is None or name not in expected:
                unexpected.append(f"{ckpt_name} ({file.name})")
                continue
            shaped.add(name)
            if tuple(info["shape"]) != expected[name]:
                misshaped.append(f"{ckpt_name}: checkpoint {tuple(info['shape'])} vs model {expected[name]} ({file.name})")
            elif why := _parameter_problem(info):  # found now, before any weight is read
                unreadable.append(f"{ckpt_name} ({file.name}): {why}")
            else:
                where[name] = (file, info, ckpt_name)
    if weight_map is not None:
        unreadable += [f"{n}: the index puts it in {f}, which does not hold it" for n, f in weight_map.items()
                       if n not in seen]
    missing = sorted(set(expected) - shaped)
    if missing or unexpected or misshaped or unreadable:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
        if misshaped:
            parts.append(f"mis-shaped tensors: {'; '.join(sorted(misshaped))}")
        if unreadable:
            parts.append(f"unreadable tensors: {'; '.join(sorted(unreadable))}")
        raise CheckpointError(f"{folder}: checkpoint does not match the model: " + " | ".join(parts))
    if dtype is None and len({info["dtype"] for _, info, _ in where.values()}) > 1:
        dtype = mixed_dtype or _ST_DTYPES[next(iter(where.values()))[1]["dtype"]]
    params = dict(module.named_parameters(remove_duplicate=True))
    by_file: dict[Path, list[str]] = {}
    for name, (file, _, _) in where.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():  # one shard at a time, one tensor at a time, read straight into its memory
        header_bytes, infos = _read_header(file, with_size=True)
        with open(file, "rb", buffering=0) as f:
            for name in names:
                info = infos[where[name][2]]
                t = _read_tensor(f, 8 + header_bytes, info, file)
                if dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
                t = t.to(device)
                owner, _, leaf = name.rpartition(".")
                mod = module.get_submodule(owner) if owner else module
                mod._parameters[leaf] = torch.nn.Parameter(t, requires_grad=params[name].requires_grad)


def _parameter_problem(info: dict) -> str | None:
    """Why a (well-formed) header entry cannot be read into a model parameter, a float tensor; None if it can."""
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None or not dtype.is_floating_point:
        return f"dtype {info['dtype']} (model weights must be F32, F16, BF16 or F64)"
    begin, end = info["data_offsets"]
    size = math.prod(info["shape"]) * dtype.itemsize
    if end - begin != size:
        return f"{end - begin} bytes for shape {info['shape']} of {info['dtype']} ({size} expected)"
    return None


def _read_tensor(f, data_start: int, info: dict, file: Path) -> torch.Tensor:
    """Plain reads into a fresh tensor: no memory map, so the page cache never counts against the process."""
    if why := _parameter_problem(info):  # load_state_into checked every entry already; other callers read one
        raise CheckpointError(f"{file}: {why}")
    begin, _ = info["data_offsets"]
    t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
    raw = t.view(-1).view(torch.uint8) if t.numel() else t.view(torch.uint8)
    f.seek(data_start + begin)
    view = memoryview(raw.numpy()).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{file}: truncated safetensors file")
        got += n
    return t


def check_causal_lm(folder: Path) -> None:
    """Refuse a checkpoint whose config.json names other architectures than Qwen3ForCausalLM (e.g. a PRMU export
    given as the policy), naming file and field; a config without the field passes (its tensors are checked)."""
    archs = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("architectures")
    if isinstance(archs, list) and archs and CAUSAL_LM not in archs:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: architectures = {archs}, not {CAUSAL_LM}: this loads "
                              "Qwen3 causal LMs only (reward models load with minitagpr.model.reward)")


def config_dtype(cfg: Qwen3Config) -> torch.dtype | None:
    """The float dtype config.json's torch_dtype names ("bfloat16"), or None."""
    named = getattr(torch, cfg.torch_dtype or "", None)
    return named if isinstance(named, torch.dtype) and named.is_floating_point else None


def load_pretrained(path_or_hub_id, dtype: torch.dtype | None = None, device="cpu") -> Qwen3ForCausalLM:
    """Load a HF Qwen3 causal-LM checkpoint (local folder or cached hub id). dtype=None keeps the stored dtype (one
    for all tensors: a checkpoint that mixes dtypes loads in its config's torch_dtype, see `load_state_into`)."""
    folder = resolve_checkpoint(path_or_hub_id)
    try:
        cfg = Qwen3Config.from_json(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    check_causal_lm(folder)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    skip = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # tied: the head is the embedding
    load_state_into(model, folder, dtype=dtype, device=device, skip=skip, mixed_dtype=config_dtype(cfg))
    model.tie_weights()
    return model


# ----------------------------------------------------------------------------------------------- saving
def export_state_dict(model: Qwen3ForCausalLM) -> dict[str, torch.Tensor]:
    """HF names -> tensors, without the duplicate head of a tied model (safetensors refuses shared storage)."""
    sd = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=True)}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _siblings(out_dir: Path, kind: str) -> list[Path]:
    """The `.NAME.tmp-*` (an export being written) or `.NAME.old-*` (the export it replaces) folders beside out_dir,
    oldest first."""
    if not out_dir.parent.is_dir():
        return []
    found = [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.{kind}-")]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def files_digest(folder: str | os.PathLike, edge_bytes: int = 1 << 20) -> str:
    """16 hex digits identifying a checkpoint folder's weights and tokenizer without reading every weight: each
    safetensors file's name, size, first and last `edge_bytes` (its header and tensors at both ends), and every
    other small file (config, tokenizer, user files) whole. A re-export or a fine-tune into the same folder gives
    another digest (a resume must not mix samples of two policies)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}:".encode())
        with open(path, "rb") as f:
            if path.suffix == ".safetensors" and size > 2 * edge_bytes:
                h.update(f.read(edge_bytes))
                f.seek(size - edge_bytes)
                h.update(f.read(edge_bytes))
            elif path.suffix == ".safetensors" or size <= 16 * edge_bytes:
                h.update(f.read())
    return h.hexdigest()[:16]


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder's entries, so a rename that commits it survives a power loss, not just a killed
    process. Filesystems that cannot fsync a folder (some network and FUSE mounts) are skipped for folders."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not Path(path).is_dir() or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                                                        errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_dir(out_dir: Path):
    """A temporary sibling folder `.NAME.tmp-*`; `commit()` swaps it into place so readers never see a half-written
    folder. The folder and its files get the modes a plain mkdir/open would (0o777/0o666 less the umask), not
    mkdtemp's private 0700, so another user (e.g. an inference server) can read the export.

    The swap is two renames, out_dir -> `.NAME.old-PID` then tmp -> out_dir, and the old folder is deleted last. A kill
    between the renames leaves no out_dir but a complete `.NAME.old-PID`: loading names it, and the next export to
    out_dir first renames it back. Every other `.NAME.tmp-*`/`.NAME.old-*` is debris of a killed export and is deleted
    then (one export to an out_dir at a time)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    olds = _siblings(out_dir, "old")
    if olds and not out_dir.exists():
        os.replace(olds.pop(), out_dir)  # killed between commit's renames: the previous export is back
    for debris in olds + _siblings(out_dir, "tmp"):
        shutil.rmtree(debris, ignore_errors=True)
    not_an_export = out_dir.exists() and not (out_dir / "config.json").is_file()
    if not_an_export and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: exists and is not a model export (no config.json); a save replaces the "
                              "whole folder, so give a new or empty folder")  # e.g. a run folder: never wiped
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))

    def commit():
        umask = _umask()
        paths = [tmp, *tmp.rglob("*")]
        for path in paths:  # safetensors writes its files 0600 too
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        for path in reversed(paths):  # on disk (entries before their folder) before the renames make them the export
            fsync_path(path)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)  # the new name is durable before the old export goes
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    return tmp, commit


def save_safetensors_shards(state_dict: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int,
                            dtype: torch.dtype | None = None) -> None:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards + index when over max_shard_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    total = 0
    for name, t in state_dict.items():
        t = t.detach().to("cpu", dtype=dtype or t.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
        total += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def save_pretrained(model: Qwen3ForCausalLM, out_dir, *, state_dict: dict[str, torch.Tensor] | None = None,
                    max_shard_bytes: int = 2 * 1024**3, dtype: torch.dtype | None = None,
                    extra_files: dict[str, Path] | None = None) -> Path:
    """config.json + safetensors (sharded above max_shard_bytes) that transformers' Qwen3ForCausalLM loads.

    `state_dict` overrides the model's tensors (e.g. a full state dict gathered from FSDP shards on rank 0).
    `extra_files` {name: source path} are copied in (tokenizer files). The folder appears atomically and replaces
    an earlier export there as a whole; any other non-empty folder is refused (its files would be lost)."""
    out_dir = Path(out_dir)
    sd = export_state_dict(model) if state_dict is None else dict(state_dict)
    if model.config.tie_word_embeddings:  # a given state_dict (gathered from FSDP shards) still holds the tied head
        sd.pop("lm_head.weight", None)
    cfg = model.config.to_dict()
    if dtype is not None or sd:
        cfg["torch_dtype"] = str(dtype or next(iter(sd.values())).dtype).removeprefix("torch.")
    tmp, commit = atomic_dir(out_dir)
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_safetensors_shards(sd, tmp, max_shard_bytes, dtype)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
