"""HF checkpoint I/O: round trips through transformers (one file and shards), and every bad input named."""
import dataclasses
import json
import re
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitagpr.model import CheckpointError, ConfigError, Qwen3Config, load_pretrained, save_pretrained
from minitagpr.model.presets import build_model, make_tiny_checkpoint, tiny_config
from train_fixtures import randomise_norms

transformers = pytest.importorskip("transformers")


def logits_of(model, ids):
    with torch.no_grad():
        return model.logits(model(ids))


@pytest.mark.parametrize("tied", [True, False])
def test_our_save_loads_in_transformers_with_same_logits(tmp_path, tied):
    model = build_model(tiny_config("tiny", tie_word_embeddings=tied), seed=11).eval()
    randomise_norms(model, seed=12)
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=40_000)  # forces several shards
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (logits_of(model, ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_transformers_save_loads_in_ours_with_same_logits(tmp_path, shard):
    cfg = transformers.Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   tie_word_embeddings=False)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    randomise_norms(hf, seed=13)
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path / "hf", **kwargs)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 320, (3, 10))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (logits_of(ours, ids) - ref).abs().max().item() <= 1e-4


def test_load_dtype_and_tied_head(tmp_path):
    make_tiny_checkpoint(tmp_path / "c", seed=3)
    model = load_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_save_is_atomic_and_replaces(tmp_path):
    model = build_model(tiny_config("tiny"), seed=1)
    out = tmp_path / "c"
    save_pretrained(model, out)
    second = build_model(tiny_config("tiny"), seed=2)
    save_pretrained(second, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left behind
    again = load_pretrained(out)
    assert torch.equal(again.model.embed_tokens.weight, second.model.embed_tokens.weight)  # the second save won
    assert not torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_save_into_a_folder_that_is_not_an_export_is_refused_and_leaves_it_alone(tmp_path):
    """A save replaces its folder as a whole: pointed at a run folder, it would have deleted everything in it."""
    model = build_model(tiny_config("tiny"), seed=1)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"run: exists and is not a model export \(no config.json\)"):
        save_pretrained(model, run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left either
    (tmp_path / "empty").mkdir()
    save_pretrained(model, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "config.json").is_file()


def _text_file(path):
    path.write_text("{}")
    return path


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_gets_the_modes_of_the_umask_not_private_ones(tmp_path, umask):
    # another user (an inference server under its own uid) must be able to read the export
    before = os.umask(umask)
    try:
        out = save_pretrained(build_model(tiny_config("tiny"), seed=1), tmp_path / "c", max_shard_bytes=40_000,
                              extra_files={"tokenizer.json": _text_file(tmp_path / "tok.json")})
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {0o666 & ~umask}, modes


def _kill_at_second_rename(monkeypatch):
    """The export dies after moving the previous folder aside, before its own folder takes the name."""
    from minitagpr.model import checkpoint as C
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        return real(src, dst)

    monkeypatch.setattr(C.os, "replace", replace)


def test_export_killed_between_its_renames_is_named_on_load_and_recovered_by_the_next(tmp_path, monkeypatch):
    first = build_model(tiny_config("tiny"), seed=1)
    out = save_pretrained(first, tmp_path / "c")
    with monkeypatch.context() as m:
        _kill_at_second_rename(m)
        with pytest.raises(KeyboardInterrupt):
            save_pretrained(build_model(tiny_config("tiny"), seed=2), out)
    assert not out.exists()
    with pytest.raises(CheckpointError, match=r"\.c\.old-\d+ beside it holds the export it was replacing"):
        load_pretrained(out)
    # the next export restores the previous folder first: dying before its own commit loses nothing either
    with pytest.raises(FileNotFoundError):
        save_pretrained(build_model(tiny_config("tiny"), seed=3), out, extra_files={"x": tmp_path / "missing"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert torch.equal(load_pretrained(out).model.embed_tokens.weight, first.model.embed_tokens.weight)


def test_export_clears_debris_of_killed_exports(tmp_path):
    out = save_pretrained(build_model(tiny_config("tiny"), seed=1), tmp_path / "c")
    for debris in (".c.tmp-abc123", ".c.old-999999"):  # killed while writing; killed while deleting the old folder
        (tmp_path / debris).mkdir()
        (tmp_path / debris / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".cc.tmp-abc123").mkdir()  # another export's folder
    save_pretrained(build_model(tiny_config("tiny"), seed=2), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cc.tmp-abc123", "c"]


# ----------------------------------------------------------------------------------------------- bad inputs
def _ckpt(tmp_path, **kw):
    return make_tiny_checkpoint(tmp_path / "c", seed=0, **kw)


def _rewrite(folder, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_named_together(tmp_path):
    folder = _ckpt(tmp_path)

    def damage(sd):
        del sd["model.norm.weight"]
        sd["model.extra.weight"] = torch.zeros(3)
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 7)
    _rewrite(folder, damage)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(folder)
    msg = str(e.value)
    assert "missing tensors: model.norm.weight" in msg
    assert "unexpected tensors: model.extra.weight" in msg
    assert "model.layers.0.mlp.up_proj.weight: checkpoint (7, 7)" in msg


def test_truncated_file_is_named(tmp_path):
    folder = _ckpt(tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        load_pretrained(folder)


def test_a_file_cut_inside_its_last_tensor_is_named_before_any_weight_is_read(tmp_path):
    """tensor_names (evaluate's check of every checkpoint before decoding) reads headers only: the header's byte
    ranges, counted from after the 8-byte length and the header, must reach past the end of a file cut short."""
    from minitagpr.model.checkpoint import tensor_names
    folder = _ckpt(tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        tensor_names(folder)


def test_config_missing_field_and_unsupported_settings(tmp_path):
    folder = _ckpt(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    broken = {k: v for k, v in cfg.items() if k != "hidden_size"}
    broken.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}, use_sliding_window=True, max_window_layers=0,
                  fancy_key=1)
    (folder / "config.json").write_text(json.dumps(broken))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(folder)
    msg = str(e.value)
    for part in ("config.json", "missing fields hidden_size", "rope_scaling", "use_sliding_window", "fancy_key"):
        assert part in msg


@pytest.mark.parametrize("rope, extra, message", [
    ({"type": "yarn", "factor": 4.0, "rope_theta": 1e6}, {}, "only rope_type 'default'"),  # the older key name
    ({"full_attention": {"rope_type": "yarn", "factor": 4.0}}, {}, "only rope_type 'default'"),  # per layer type
    ({"rope_type": "default", "rope_theta": 5e5}, {"rope_theta": 1e6}, "differ (transformers reads the latter)"),
    (None, {"attention_dropout": 0.1}, "attention dropout is not implemented"),
])
def test_a_rope_or_dropout_this_model_would_not_run_as_written_is_refused(tmp_path, rope, extra, message):
    """transformers runs each of these configs with another RoPE (YaRN scales cos/sin at every length) or with
    attention dropout; read as the default RoPE without dropout, every logit would differ without a word."""
    folder = _ckpt(tmp_path)
    cfg = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "rope_theta"}
    if rope is not None:
        cfg["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps({**cfg, **extra}))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_pretrained(folder)


def test_configs_transformers_runs_as_plain_qwen3_load_as_it(tmp_path):
    """Spellings transformers reads as this very model are accepted (they were refused): a sliding window that no
    layer uses (max_window_layers >= num_hidden_layers), "swish" (= silu), num_key_value_heads null (no GQA),
    rope_scaling naming the default RoPE."""
    folder = _ckpt(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    plain = Qwen3Config.from_dict(cfg)
    n = cfg["num_hidden_layers"]
    for change in ({"use_sliding_window": True, "max_window_layers": n, "sliding_window": 16},
                   {"hidden_act": "swish"}, {"rope_scaling": {"rope_type": "default"}}):
        assert Qwen3Config.from_dict({**cfg, **change}) == plain, change
    no_gqa = Qwen3Config.from_dict({**cfg, "num_key_value_heads": None})
    assert no_gqa.num_key_value_heads == cfg["num_attention_heads"]
    with pytest.raises(ConfigError, match=f"max_window_layers={n - 1} < num_hidden_layers={n}"):
        Qwen3Config.from_dict({**cfg, "use_sliding_window": True, "max_window_layers": n - 1, "sliding_window": 16})


def test_rope_theta_nested_in_rope_parameters_is_read(tmp_path):
    folder = _ckpt(tmp_path)
    cfg = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "rope_theta"}
    for rope in ({"rope_type": "default", "rope_theta": 5e5}, {"type": "default", "rope_theta": 5e5}):
        (folder / "config.json").write_text(json.dumps({**cfg, "rope_parameters": rope}))
        assert Qwen3Config.from_json(folder / "config.json").rope_theta == 5e5
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_theta": 5e5,
                                                    "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}))
    assert Qwen3Config.from_json(folder / "config.json").rope_theta == 5e5  # the same value twice is fine


def test_real_qwen3_configs_parse(qwen3_configs_dir):
    for name, (layers, tied) in {"Qwen3-0.6B": (28, True), "Qwen3-1.7B": (28, True), "Qwen3-8B": (36, False)}.items():
        cfg = Qwen3Config.from_json(qwen3_configs_dir / name / "config.json")
        assert cfg.num_hidden_layers == layers and cfg.tie_word_embeddings == tied and cfg.head_dim == 128


def test_the_qwen3_0_6b_preset_is_the_real_config(qwen3_configs_dir):
    real = Qwen3Config.from_json(qwen3_configs_dir / "Qwen3-0.6B" / "config.json")
    ours = dataclasses.replace(tiny_config("qwen3-0.6b"), bos_token_id=real.bos_token_id,
                               eos_token_id=real.eos_token_id, torch_dtype=real.torch_dtype)  # the shape, not the ids
    assert ours == real


def test_pickled_weights_are_refused(tmp_path):
    folder = _ckpt(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_pretrained(folder)


def test_missing_shard_named(tmp_path):
    save_pretrained(build_model(tiny_config("tiny"), seed=0), tmp_path / "c", max_shard_bytes=40_000)
    shard = sorted((tmp_path / "c").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {shard.name}"):
        load_pretrained(tmp_path / "c")


def test_hub_id_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        load_pretrained("Qwen/Qwen3-0.6B")


def test_hub_offline_set_to_true_is_offline_too(tmp_path, monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE=true (or yes) as offline: the error says so rather than calling the hub."""
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set, so it cannot be downloaded"):
        load_pretrained("Qwen/Qwen3-0.6B")


def test_a_missing_folder_name_without_a_slash_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"sft_typo: no such checkpoint folder \(and not a hub id"):
        load_pretrained("sft_typo")


def test_hub_id_resolves_from_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-qwen3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_tiny_checkpoint(repo / "snapshots" / commit, seed=5)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = load_pretrained("acme/tiny-qwen3")
    assert model.config.vocab_size == 512


PEAK_SCRIPT = r"""
import sys, torch
from minitagpr.model import load_pretrained
def kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
warm = load_pretrained(sys.argv[2])  # page in the code paths (library pages count in RSS too), then measure
float(sum(p.sum() for p in warm.parameters()))
del warm
before = kb('VmRSS:')
model = load_pretrained(sys.argv[1])
total = sum(float(p.sum()) for p in model.parameters())  # touch every weight so all of it is resident
print(before, kb('VmHWM:'))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read peak RSS")
def test_sharded_load_peak_memory_is_model_plus_one_shard(tmp_path):
    cfg = tiny_config("tiny", vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
    model = build_model(cfg, seed=0)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())  # ~160 MB
    shard_bytes = 48 * 1024**2
    save_pretrained(model, tmp_path / "big", max_shard_bytes=shard_bytes)
    del model
    largest = max(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    make_tiny_checkpoint(tmp_path / "small", seed=0)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big"), str(tmp_path / "small")], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    before_kb, peak_kb = map(int, out.stdout.split())
    grown = (peak_kb - before_kb) * 1024
    print(f"model {model_bytes / 2**20:.0f} MiB, largest shard {largest / 2**20:.0f} MiB, "
          f"peak growth {grown / 2**20:.0f} MiB")
    assert grown <= 1.2 * (model_bytes + largest)


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_a_full_state_dict_of_a_tied_model_saves_without_the_head_and_loads_tied(tmp_path):
    """The FSDP export passes a gathered state dict, which holds lm_head.weight for a tied model too."""
    from safetensors import safe_open
    tied = build_model(tiny_config("tiny", tie_word_embeddings=True), seed=0)
    save_pretrained(tied, tmp_path / "m", state_dict=tied.state_dict())
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    back = load_pretrained(tmp_path / "m")
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_a_tied_checkpoint_that_also_stores_the_head_loads_tied(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = make_tiny_checkpoint(tmp_path / "m", preset="tiny", seed=0, tie_word_embeddings=True)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # some hub checkpoints keep it
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = load_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_config_records_the_dtype_the_weights_were_saved_in(tmp_path):
    model = build_model(tiny_config("tiny"), seed=0)
    save_pretrained(model, tmp_path / "m", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_shards_match_their_index_and_its_total_size(tmp_path):
    model = build_model(tiny_config("tiny"), seed=0)
    save_pretrained(model, tmp_path / "m", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    files = {p.name for p in (tmp_path / "m").glob("*.safetensors")}
    assert len(files) > 1 and files == set(index["weight_map"].values())  # no unlisted (empty) shard
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())


def test_tensors_of_exactly_max_shard_bytes_stay_one_file(tmp_path):
    """Shards are cut when the tensors are *over* max_shard_bytes."""
    from minitagpr.model.checkpoint import save_safetensors_shards
    save_safetensors_shards({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path, max_shard_bytes=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_an_empty_architectures_list_loads_like_a_config_without_one(tmp_path):
    folder = _ckpt(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": []}))
    assert load_pretrained(folder).config.vocab_size == cfg["vocab_size"]


def _digest_folder(folder):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(40)))
    (folder / "tokenizer.json").write_bytes(bytes(range(100, 140)))
    return folder


@pytest.mark.parametrize("change", ["safetensors_tail", "middle_of_another_file", "a_file_renamed"])
def test_files_digest_changes_with_what_it_promises_to_read(tmp_path, change):
    """files_digest reads each safetensors file's first and last edge_bytes (here 4 of 40), every other small file
    whole, and every file's name."""
    from minitagpr.model.checkpoint import files_digest
    folder = _digest_folder(tmp_path / "c")
    before = files_digest(folder, edge_bytes=4)
    if change == "safetensors_tail":
        (folder / "model.safetensors").write_bytes(bytes(range(39)) + b"\xff")
    elif change == "middle_of_another_file":
        (folder / "tokenizer.json").write_bytes(bytes(range(100, 119)) + b"\xff" + bytes(range(120, 140)))
    else:
        (folder / "tokenizer.json").rename(folder / "vocab.json")
    assert files_digest(folder, edge_bytes=4) != before


def test_an_export_is_on_disk_before_its_rename_makes_it_the_export(tmp_path, monkeypatch):
    """A kill could not leave a half export, but a power loss could: zero-length shards under the final name with
    the old export already gone. Every file and the folder are fsynced before the rename, the parent after it
    (pinned 2026-11-29)."""
    import os
    from minitagpr.model import save_pretrained
    from minitagpr.model.presets import build_model, tiny_config
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = save_pretrained(build_model(tiny_config("tiny"), seed=0), tmp_path / "c", max_shard_bytes=40_000)
    commit = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out.resolve()))
    tmp = events[commit][1]
    synced_before = {e[1] for e in events[:commit] if e[0] == "fsync"}
    files = [p.name for p in out.iterdir()]
    assert len([f for f in files if f.endswith(".safetensors")]) > 1 and "config.json" in files
    assert {os.path.join(tmp, f) for f in files} | {tmp} <= synced_before
    assert ("fsync", str(tmp_path.resolve())) in events[commit + 1:]


def test_a_checkpoint_that_mixes_dtypes_loads_in_one_dtype_with_dtype_none(tmp_path):
    # bf16 matrices beside fp32 norms: kept as stored, the first matmul of a norm's output failed on a dtype mismatch
    from safetensors.torch import load_file, save_file
    folder = make_tiny_checkpoint(tmp_path / "mixed", seed=3)
    sd = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.ndim == 2 else v for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    raw = (folder / "model.safetensors").read_bytes()  # the header's first tensor decides when config.json names none
    first = next(k for k in json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]) if k != "__metadata__")
    config = json.loads((folder / "config.json").read_text())
    for named, want in (("bfloat16", torch.bfloat16), ("float32", torch.float32),
                        (None, torch.bfloat16 if sd[first].ndim == 2 else torch.float32)):
        (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": named}))
        model = load_pretrained(folder)
        assert {p.dtype for p in model.parameters()} == {want}, named
        assert model(torch.tensor([[1, 2, 3]])).dtype == want
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})  # one stored dtype: kept as it is
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert {p.dtype for p in load_pretrained(folder).parameters()} == {torch.float32}


def test_a_load_does_not_import_torchs_tracing_stack(tmp_path):
    # nn.Embedding's default init on the meta device ran torch's reference normal_, whose first use imports sympy
    # and dynamo: ~1.5 s of every process's first load (0.42 s of 1.93 s left for the Qwen3-0.6B two-layer slice)
    from minitagpr.model.reward import PRMU, save_reward_model
    folder = make_tiny_checkpoint(tmp_path / "lm")
    save_reward_model(PRMU(tiny_config("tiny"), ["u1", "u2"]), tmp_path / "rm")
    script = ("import sys, torch; from minitagpr.model import load_pretrained; "
              "from minitagpr.model.reward import load_reward_model; "
              f"load_pretrained({str(folder)!r}); load_reward_model({str(tmp_path / 'rm')!r}); "
              "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
