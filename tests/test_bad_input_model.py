"""Bad model checkpoints get one CheckpointError naming the file and the key or tensor, never a deep traceback:
config.json values of the wrong type or range, malformed safetensors headers and indexes, damaged reward files."""
import json
import re
import struct

import pytest

from minitagpr.model import CheckpointError, load_pretrained, save_pretrained
from minitagpr.model.presets import build_model, make_tiny_checkpoint, tiny_config
from minitagpr.model.reward import PRMU, USER_TABLE_FILE, load_reward_model, save_reward_model


def _set_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return folder / "config.json"


def _rewrite_header(file, edit):
    """Replace the JSON header of a safetensors file by edit(header), keeping the tensor bytes."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _sharded(tmp_path):
    return save_pretrained(build_model(tiny_config("tiny"), seed=0), tmp_path / "c", max_shard_bytes=40_000)


@pytest.mark.parametrize("key, value", [
    ("num_key_value_heads", 0),  # was a ZeroDivisionError
    ("num_key_value_heads", 3),  # 4 query heads: named, but without the file
    ("hidden_size", "64"),  # was a TypeError inside torch
    ("num_hidden_layers", None),  # was a TypeError in range()
    ("num_hidden_layers", True),  # was one layer, silently
    ("num_attention_heads", "4"),  # was "not all arguments converted during string formatting"
    ("rope_theta", "big"),  # loaded, then a TypeError at the first forward pass
    ("rms_norm_eps", -1),  # was accepted
    ("head_dim", 23),  # odd: RoPE rotates pairs of dimensions
    ("eos_token_id", "<|im_end|>"),  # was accepted
])
def test_config_value_of_wrong_type_or_range_names_file_and_key(tmp_path, key, value):
    config = _set_config(make_tiny_checkpoint(tmp_path / "c"), **{key: value})
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "c")
    assert str(config) in str(e.value) and f"'{key}'" in str(e.value)


def test_config_not_utf8_is_named(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "c")
    (folder / "config.json").write_bytes(b'{"vocab_size": "\xff"}')
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'config.json'}: not UTF-8 text")):
        load_pretrained(folder)


def test_config_that_is_a_folder_is_named(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "c")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'config.json'}: cannot read config.json")):
        load_pretrained(folder)


@pytest.mark.parametrize("edit, expected", [
    (lambda h: list(h), "expected a JSON object, got list"),  # was a TypeError from dict.pop
    (lambda h: {**h, "model.norm.weight": {k: v for k, v in h["model.norm.weight"].items() if k != "data_offsets"}},
     "tensor 'model.norm.weight': field 'data_offsets'"),  # was a KeyError
    (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "data_offsets": [0]}},
     "tensor 'model.norm.weight': field 'data_offsets'"),  # was an IndexError
    (lambda h: {**h, "model.norm.weight": "oops"}, "tensor 'model.norm.weight': expected an object"),
    (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "shape": [64, -1]}},
     "tensor 'model.norm.weight': field 'shape'"),  # was a RuntimeError from torch.empty
])
def test_malformed_safetensors_header_names_file_and_tensor(tmp_path, edit, expected):
    file = make_tiny_checkpoint(tmp_path / "c") / "model.safetensors"
    _rewrite_header(file, edit)
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: corrupt safetensors header") + ".*"
                       + re.escape(expected)):
        load_pretrained(tmp_path / "c")


@pytest.mark.parametrize("edit, expected", [
    (lambda m: list(m.values()), "field 'weight_map': expected an object"),  # was an AttributeError
    (lambda m: {**m, "model.norm.weight": 1}, "weight_map['model.norm.weight']"),  # was a TypeError from Path / int
    (lambda m: {**m, "model.norm.weight": "../" + m["model.norm.weight"]},  # a file outside the checkpoint folder
     "weight_map['model.norm.weight']: expected the name of a .safetensors file in this folder"),
])
def test_malformed_index_weight_map_names_index_and_entry(tmp_path, edit, expected):
    index = _sharded(tmp_path) / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "weight_map": edit(data["weight_map"])}))
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: {expected}")):
        load_pretrained(tmp_path / "c")


@pytest.mark.parametrize("edit, expected", [
    (lambda e: {**e, "dtype": "I64"}, "model.norm.weight (model.safetensors): dtype I64 (model weights must be"),
    (lambda e: {**e, "dtype": "F8_E4M3"}, "model.norm.weight (model.safetensors): dtype F8_E4M3"),
    (lambda e: {**e, "dtype": "F16"}, "model.norm.weight (model.safetensors): 256 bytes for shape [64] of F16 "
                                      "(128 expected)"),
])
def test_a_tensor_that_cannot_be_a_weight_is_named_before_any_is_read(tmp_path, edit, expected):
    """Another dtype or byte range in a well-formed header: a bare RuntimeError (I64) or an error naming no tensor,
    raised after other tensors were already read (pinned 2026-11-29)."""
    file = make_tiny_checkpoint(tmp_path / "c") / "model.safetensors"
    _rewrite_header(file, lambda h: {**h, "model.norm.weight": edit(h["model.norm.weight"])})
    with pytest.raises(CheckpointError, match="unreadable tensors: " + re.escape(expected)):
        load_pretrained(tmp_path / "c")


def test_a_tensor_in_two_shards_or_not_where_the_index_says_is_named(tmp_path):
    """A shard holding a tensor the index puts elsewhere loaded silently, the last file read winning."""
    folder = _sharded(tmp_path)
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    home = weight_map["model.norm.weight"]
    other = next(f for f in sorted(set(weight_map.values())) if f != home)
    _rewrite_header(folder / other, lambda h: {**h, "model.norm.weight": h[next(
        n for n in h if n != "__metadata__")]})  # another tensor's bytes under the name
    with pytest.raises(CheckpointError, match=re.escape(f"model.norm.weight: in both {min(home, other)} and "
                                                        f"{max(home, other)}")):
        load_pretrained(folder)


@pytest.mark.parametrize("entry", ["moved", "phantom"])
def test_an_index_that_disagrees_with_its_shards_is_named(tmp_path, entry):
    """The index is the map a load trusts: a tensor it puts in another shard than the one holding it, or in a shard
    that does not hold it at all, is a damaged checkpoint, named, not loaded from wherever it happens to be."""
    folder = _sharded(tmp_path)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = list(data["weight_map"].values())
    name, home = next((n, f) for n, f in data["weight_map"].items() if shards.count(f) > 1)  # still read when moved
    other = next(f for f in sorted(set(shards)) if f != home)
    if entry == "moved":
        data["weight_map"][name] = other
        expected = f"{name}: in {home}, but the index puts it in {other}"
    else:
        data["weight_map"]["model.phantom.weight"] = home
        expected = f"model.phantom.weight: the index puts it in {home}, which does not hold it"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unreadable tensors: .*" + re.escape(expected)):
        load_pretrained(folder)


def test_an_empty_tensor_is_a_well_formed_header_entry(tmp_path):
    """safetensors stores a zero-element tensor as begin == end: a valid entry, not a corrupt header."""
    from minitagpr.model.checkpoint import tensor_names
    file = make_tiny_checkpoint(tmp_path / "c") / "model.safetensors"
    end = json.loads(file.read_bytes()[8:8 + struct.unpack("<Q", file.read_bytes()[:8])[0]])
    end = max(e["data_offsets"][1] for n, e in end.items() if n != "__metadata__")
    _rewrite_header(file, lambda h: {**h, "empty": {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}})
    assert "empty" in tensor_names(tmp_path / "c")


def test_a_mis_shaped_renamed_tensor_is_not_also_called_missing(tmp_path):
    from minitagpr.model.checkpoint import load_state_into
    from safetensors.torch import save_file
    import torch
    folder = tmp_path / "c"
    folder.mkdir()
    save_file({"enc.lin.weight": torch.zeros(3, 3)}, str(folder / "model.safetensors"))
    with torch.device("meta"):
        module = torch.nn.Sequential()
        module.add_module("lin", torch.nn.Linear(2, 2, bias=False))
    with pytest.raises(CheckpointError) as err:
        load_state_into(module, folder, dtype=None, device="cpu", rename=lambda n: n.removeprefix("enc."))
    assert "mis-shaped tensors: enc.lin.weight" in str(err.value) and "missing" not in str(err.value)


def test_index_not_utf8_is_named(tmp_path):
    index = _sharded(tmp_path) / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"\xff": 1}}')  # was a UnicodeDecodeError
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: not a valid safetensors index")):
        load_pretrained(tmp_path / "c")


def test_reward_init_from_truncated_weights_names_the_file(tmp_path):
    file = make_tiny_checkpoint(tmp_path / "lm", vocab_size=96) / "model.safetensors"
    file.write_bytes(file.read_bytes()[:20])  # was safetensors' "incomplete metadata" from _has_tensor
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: truncated safetensors file")):
        load_reward_model(tmp_path / "lm", new_head=True)


def test_reward_index_with_a_list_weight_map_names_the_index(tmp_path):
    index = _sharded(tmp_path) / "model.safetensors.index.json"
    index.write_text(json.dumps([]))  # was an AttributeError from _has_tensor's .get
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: not a valid safetensors index")):
        load_reward_model(tmp_path / "c", new_head=True)


@pytest.mark.parametrize("damage", ["truncate", "header_list"])
def test_damaged_user_table_names_the_file(tmp_path, damage):
    model = PRMU(tiny_config("tiny", vocab_size=96), ["a", "b"])
    model.init_weights(0)
    file = save_reward_model(model, tmp_path / "rm") / USER_TABLE_FILE
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[:-8])  # was safetensors' SafetensorError
        expected = f"{file}: truncated safetensors file"
    else:
        _rewrite_header(file, lambda h: list(h))
        expected = f"{file}: corrupt safetensors header"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_reward_model(tmp_path / "rm")


def test_reward_model_given_as_a_causal_lm_is_named(tmp_path):
    model = PRMU(tiny_config("tiny", vocab_size=96), ["a"])
    model.init_weights(0)
    folder = save_reward_model(model, tmp_path / "rm")  # e.g. policy= pointing at a PRMU export
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'config.json'}: architectures = "
                                                        "['Qwen3ForSequenceClassification'], not Qwen3ForCausalLM")):
        load_pretrained(folder)
    _set_config(folder, architectures=None)  # without the label, the tensors still tell
    with pytest.raises(CheckpointError, match="unexpected tensors: score.weight"):
        load_pretrained(folder)


def test_position_ids_targets_and_weights_of_another_shape_are_named():
    # 1-D position_ids once broadcast RoPE over the heads (silently wrong when T equals the head counts)
    import torch
    model = build_model(tiny_config("tiny", num_key_value_heads=4))
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=re.escape("position_ids must be (1, 4) or (1, 4), got (4,)")):
        model(ids, torch.arange(4), kv_cache=model.new_kv_cache(1, 8))
    with pytest.raises(ValueError, match=re.escape("position_ids must be (1, 4) or (1, 4), got (1, 3)")):
        model(ids, torch.arange(3)[None])
    with pytest.raises(ValueError, match=re.escape("targets must be (B, T) = (1, 4) like the input, got (4,)")):
        model(ids, targets=ids[0])
    with pytest.raises(ValueError, match=re.escape("token_weights must be (B, T) = (1, 4) like the input, got (1, 3)")):
        model(ids, targets=ids, token_weights=torch.ones(1, 3))
    logp, _ = model(ids.expand(2, 4), torch.arange(4)[None], targets=ids.expand(2, 4))  # (1, T) positions: every row
    assert logp.shape == (2, 4)
