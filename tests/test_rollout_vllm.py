"""The vLLM adapter without vLLM: exported names/shapes against HF checkpoints, and the call order against a
recording fake `LLM` (wake weights -> load every tensor -> wake KV cache -> reset prefix cache; never reload)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors import safe_open

from minitagpr.model import presets, save_pretrained
from minitagpr.rollout import RolloutError, VLLMEngine, checkpoint_tensor_names, hf_named_tensors

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny matmuls, one thread


# ---------------------------------------------------------------------------------------------------------- names

@pytest.mark.parametrize("tied", [True, False])
def test_exported_names_and_shapes_equal_the_saved_checkpoint(tmp_path, tied):
    model = presets.build_model(presets.tiny_config("tiny", tie_word_embeddings=tied))
    folder = save_pretrained(model, tmp_path / "ckpt")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    exported = {name: tuple(t.shape) for name, t in hf_named_tensors(model)}
    assert exported == saved
    assert ("lm_head.weight" in exported) is not tied


@pytest.mark.parametrize("tied", [True, False])
def test_exported_names_are_the_transformers_qwen3_names(tied):
    transformers = pytest.importorskip("transformers")
    cfg = presets.tiny_config("tiny", tie_word_embeddings=tied)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg.to_dict()))
    expected = {n: tuple(t.shape) for n, t in hf.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight")  # HF checkpoints of tied models omit it; vLLM's loader ties it itself
    ours = {n: tuple(t.shape) for n, t in hf_named_tensors(presets.build_model(cfg))}
    assert ours == expected


def test_wrapper_prefixes_are_stripped_from_exported_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = presets.build_model(presets.tiny_config("tiny"))
    plain = [n for n, _ in hf_named_tensors(model)]
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    assert [n for n, _ in hf_named_tensors(model)] == plain


def test_fsdp2_shards_are_streamed_as_full_tensors(tmp_path):
    # Two gloo processes shard the model with FSDP2; rank 0 checks every streamed tensor against the unsharded model.
    script = tmp_path / "fsdp_stream.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
        sys.path.insert(0, {str(REPO)!r})
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        from minitagpr.model import presets
        from minitagpr.rollout import hf_named_tensors

        def run(rank):
            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=rank, world_size=2)
            cfg = presets.tiny_config("tiny")
            reference = presets.build_model(cfg, seed=3)
            model = presets.build_model(cfg, seed=3)
            mesh = init_device_mesh("cpu", (2,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            assert any(type(p).__name__ == "DTensor" for p in model.parameters())
            streamed = dict(hf_named_tensors(model))
            expected = dict(hf_named_tensors(reference))
            assert streamed.keys() == expected.keys(), (streamed.keys() ^ expected.keys())
            for name, t in expected.items():
                assert type(streamed[name]) is torch.Tensor and torch.equal(streamed[name], t), name
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.start_processes(run, nprocs=2, start_method="fork")  # fork: no second torch import
            print("FSDP-STREAM-OK")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "FSDP-STREAM-OK" in done.stdout, done.stderr[-3000:]


def test_checkpoint_tensor_names_read_single_files_and_shard_indexes(tmp_path):
    model = presets.build_model(presets.tiny_config("tiny", tie_word_embeddings=False))
    names = {n for n, _ in hf_named_tensors(model)}
    single = save_pretrained(model, tmp_path / "single")
    sharded = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=50_000)
    assert (sharded / "model.safetensors.index.json").exists()
    assert checkpoint_tensor_names(single) == names == checkpoint_tensor_names(sharded)
    with pytest.raises(RolloutError, match="no model.safetensors"):
        checkpoint_tensor_names(tmp_path)


def test_checkpoint_tensor_names_name_a_damaged_file_or_index(tmp_path):
    model = presets.build_model(presets.tiny_config("tiny"))
    single = save_pretrained(model, tmp_path / "single")
    weights = single / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
    with pytest.raises(RolloutError, match=r"model\.safetensors: truncated safetensors file"):
        checkpoint_tensor_names(single)
    sharded = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=50_000)
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()  # a partial download
    with pytest.raises(RolloutError, match=rf"shards listed in the index are missing: {shard.name}"):
        checkpoint_tensor_names(sharded)
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ["not", "a", "map"]}')
    with pytest.raises(RolloutError, match=r"index\.json: field 'weight_map'"):
        checkpoint_tensor_names(sharded)


# ---------------------------------------------------------------------------------------------------------- fake vLLM

class FakeSamplingParams:
    """Keeps what the adapter asks for, and refuses what vLLM's SamplingParams refuses."""

    def __init__(self, **kwargs):
        if kwargs.get("temperature", 1.0) == 0 and kwargs.get("n", 1) > 1:
            raise ValueError("n must be 1 when using greedy sampling")  # vLLM's own check
        if kwargs.get("temperature", 1.0) > 2:
            raise ValueError("temperature must be in [0, 2]")
        self.__dict__.update(kwargs)


class FakeLLM:
    """Records every call the adapter makes; answers generate() with deterministic completions."""

    def __init__(self, finish_reason=None):
        self.calls = []
        # None: "stop" on a stop id, else "length" (every completion is 3 tokens: ask max_new_tokens=3); a string:
        # always that
        self.finish_reason = finish_reason
        worker_model = SimpleNamespace(load_weights=self._load_weights)
        runner = SimpleNamespace(model=worker_model)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner))))

    def _load_weights(self, weights):
        names = [name for name, _ in weights]  # consume the stream like vLLM does
        self.calls.append(("load_weights", len(names)))
        return set(names)

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def collective_rpc(self, method, *args, **kwargs):
        self.calls.append(("collective_rpc", method))

    def reload_weights(self, *args, **kwargs):
        self.calls.append(("reload_weights",))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        self.params = sampling_params
        outputs = []
        for prompt, sp in zip(prompts, sampling_params):
            completions = []
            for j in range(sp.n):
                ids = [prompt["prompt_token_ids"][-1] + j + k for k in range(1, 4)]
                stopped = bool(sp.stop_token_ids) and ids[-1] in sp.stop_token_ids
                reason = self.finish_reason or ("stop" if stopped else "length")
                completions.append(SimpleNamespace(
                    index=j, token_ids=ids, text="vllm-text", finish_reason=reason,
                    logprobs=[{t: SimpleNamespace(logprob=-0.5 * (k + 1))} for k, t in enumerate(ids)]))
            outputs.append(SimpleNamespace(outputs=completions[::-1]))  # vLLM need not keep sample order
        return outputs


class DigitTokenizer:
    vocab_size = 500

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


@pytest.fixture
def policy():
    return presets.build_model(presets.tiny_config("tiny"))


def make_engine(policy, level=2, tokenizer=None, llm=None):
    names = {n for n, _ in hf_named_tensors(policy)}
    llm = llm or FakeLLM()
    eng = VLLMEngine("unused", tokenizer, llm=llm, sampling_params_cls=FakeSamplingParams, sleep_level=level,
                     expected_names=names)
    return eng, llm


def test_rl_step_call_order_never_reloads_weights_from_disk(policy):
    eng, llm = make_engine(policy, level=2)
    eng.generate([[1, 2, 3]], n=2, max_new_tokens=3)
    eng.sync_weights(hf_named_tensors(policy))
    eng.generate([[4, 5]], n=2, max_new_tokens=3)
    n_params = len(list(policy.parameters()))
    assert llm.calls == [
        ("generate", 1), ("sleep", 2),
        ("wake_up", ("weights",)), ("load_weights", n_params), ("wake_up", ("kv_cache",)), ("reset_prefix_cache",),
        ("generate", 1), ("sleep", 2),
    ]


def test_generate_after_level2_sleep_without_sync_is_refused(policy):
    eng, llm = make_engine(policy, level=2)
    eng.generate([[1, 2]], max_new_tokens=3)
    with pytest.raises(RolloutError, match="sync_weights first"):
        eng.generate([[1, 2]], max_new_tokens=3)
    assert llm.calls == [("generate", 1), ("sleep", 2)]


def test_level1_sleep_wakes_weights_then_cache_before_generating(policy):
    eng, llm = make_engine(policy, level=1)
    eng.generate([[1, 2]], max_new_tokens=3)
    eng.generate([[1, 2]], max_new_tokens=3)
    assert llm.calls == [("generate", 1), ("sleep", 1), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",)),
                         ("generate", 1), ("sleep", 1)]


def test_sync_that_misses_tensors_is_an_error(policy):
    eng, _ = make_engine(policy)
    partial = [(n, t) for n, t in hf_named_tensors(policy) if "layers.1." not in n]
    with pytest.raises(RolloutError, match="checkpoint tensors were not streamed"):
        eng.sync_weights(partial)


def test_sampling_params_carry_the_request_with_per_prompt_seeds(policy):
    eng, llm = make_engine(policy, tokenizer=DigitTokenizer())
    eng.generate([[1, 2], [3, 4], [5]], n=3, temperature=0.7, top_p=0.9, max_new_tokens=3, stop_token_ids=[7],
                 seed=4)
    first = llm.params
    eng.sync_weights(hf_named_tensors(policy))
    eng.generate([[1, 2], [3, 4], [5]], n=3, temperature=0.7, top_p=0.9, max_new_tokens=3, stop_token_ids=[7],
                 seed=4)
    sp = llm.params[0]
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.stop_token_ids) == (3, 0.7, 0.9, 3, [7])
    assert sp.allowed_token_ids == list(range(500))  # the padded vocabulary tail is excluded
    assert len({p.seed for p in llm.params}) == 3  # one seed per prompt ...
    assert [p.seed for p in llm.params] == [p.seed for p in first]  # ... a function of (seed, prompt index)


def test_vllm_outputs_become_completions_in_sample_order(policy):
    eng, _ = make_engine(policy, tokenizer=DigitTokenizer())
    group = eng.generate([[10]], n=2, stop_token_ids=[14], max_new_tokens=3)[0]
    assert [c.token_ids for c in group] == [[11, 12, 13], [12, 13, 14]]
    assert [c.finish_reason for c in group] == ["length", "stop"]
    assert group[1].text == "12 13"  # the stop id is not part of the text
    assert group[0].logprobs == [-0.5, -1.0, -1.5]


def test_vllm_stops_on_our_stop_ids_only(policy):
    """Without ignore_eos vLLM also stops on the tokenizer's EOS and generation_config's eos_token_id list,
    which the built-in engine (and the RL loop's stop list) would not."""
    eng, llm = make_engine(policy, level=0)
    eng.generate([[1, 2]], stop_token_ids=[9], max_new_tokens=3)
    assert llm.params[0].ignore_eos is True and llm.params[0].stop_token_ids == [9]


def test_greedy_with_n_above_one_asks_vllm_once_and_copies_the_answer(policy):
    eng, llm = make_engine(policy, level=0, tokenizer=DigitTokenizer())
    group = eng.generate([[10], [20]], n=3, temperature=0.0, stop_token_ids=[13], max_new_tokens=3)[0]
    assert [p.n for p in llm.params] == [1, 1]  # vLLM refuses n > 1 at temperature 0
    assert len(group) == 3 and all(c.token_ids == [11, 12, 13] and c.finish_reason == "stop" for c in group)
    group[0].token_ids.append(99)  # copies, not one list three times
    assert group[1].token_ids == [11, 12, 13]
    eng.generate([[10]], n=3, temperature=1.0, max_new_tokens=3)
    assert llm.params[0].n == 3  # sampling asks for all n at once


@pytest.mark.parametrize("temperature", [0.005, 2.5])
def test_temperatures_vllm_would_clamp_or_refuse_are_refused_by_name(policy, temperature):
    eng, llm = make_engine(policy, level=0)
    with pytest.raises(RolloutError, match=rf"temperature {temperature}: the vLLM engine samples at 0 .* \[0.01, 2\]"):
        eng.generate([[1]], temperature=temperature, max_new_tokens=3)
    assert llm.calls == []


def test_a_stop_id_at_the_length_limit_is_a_stop_and_an_aborted_request_an_error(policy):
    eng, _ = make_engine(policy, level=0, tokenizer=DigitTokenizer(), llm=FakeLLM(finish_reason="length"))
    done = eng.generate([[10]], stop_token_ids=[13], max_new_tokens=3)[0][0]
    assert (done.finish_reason, done.text) == ("stop", "11 12")  # vLLM checks the length limit first: "length"
    eng, _ = make_engine(policy, level=0, llm=FakeLLM(finish_reason="abort"))
    with pytest.raises(RolloutError, match="prompt 0's completion with finish_reason='abort' after 3 tokens"):
        eng.generate([[10]], stop_token_ids=[5], max_new_tokens=3)


def test_a_length_finish_short_of_max_new_tokens_is_an_error_and_max_model_len_is_checked_first(policy):
    """vLLM V1 also finishes with "length" when a sequence reaches max_model_len: that completion was taken as cut
    by max_new_tokens (R_f = 0) although it was shorter."""
    eng, llm = make_engine(policy, level=0, tokenizer=DigitTokenizer())
    with pytest.raises(RolloutError, match=r"finish_reason='length' after 3 tokens, not on a stop id nor at "
                                           r"max_new_tokens=8"):
        eng.generate([[10]], max_new_tokens=8)
    calls = len(llm.calls)
    with pytest.raises(RolloutError, match=r"prompt_token_ids\[1\] has 4000 tokens; with max_new_tokens=97 it "
                                           r"exceeds the engine's max_model_len=4096"):
        eng.generate([[1], [1] * 4000], max_new_tokens=97)
    assert len(llm.calls) == calls  # refused before vLLM saw it
    eng.generate([[1] * 4093], max_new_tokens=3)  # exactly full: fine


def test_vocabulary_mask_only_when_the_checkpoint_has_a_padded_tail(policy, tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 500}')  # rows == the tokenizer's 500 ids: nothing to mask
    eng = VLLMEngine(tmp_path, DigitTokenizer(), llm=FakeLLM(), sampling_params_cls=FakeSamplingParams,
                     expected_names={n for n, _ in hf_named_tensors(policy)})
    eng.generate([[1, 2]], max_new_tokens=3)
    assert not hasattr(eng.llm.params[0], "allowed_token_ids")
    (tmp_path / "config.json").write_text('{"vocab_size": 512}')
    eng = VLLMEngine(tmp_path, DigitTokenizer(), llm=FakeLLM(), sampling_params_cls=FakeSamplingParams,
                     expected_names=set())
    eng.generate([[1, 2], [3]], max_new_tokens=3)
    assert eng.llm.params[0].allowed_token_ids is eng.llm.params[1].allowed_token_ids  # one shared list


def test_per_prompt_seeds_reach_vllm_independent_of_the_split(policy):
    eng, llm = make_engine(policy, level=0)
    eng.generate([[1], [2], [3]], seed=[7, 8, 9], max_new_tokens=3)
    whole = [p.seed for p in llm.params]
    eng.generate([[3]], seed=[9], max_new_tokens=3)
    assert llm.params[0].seed == whole[2]
    assert len(set(whole)) == 3


@pytest.mark.parametrize("tied", [False, True])
def test_an_untied_models_head_must_be_streamed(tmp_path, tied):
    """lm_head.weight was exempt whatever the model: a sync without an untied model's head was accepted, and after
    level-2 sleep vLLM sampled with a discarded head."""
    policy = presets.build_model(presets.tiny_config("tiny", tie_word_embeddings=False))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 500, "tie_word_embeddings": tied}))
    names = {n for n, _ in hf_named_tensors(policy)}
    assert "lm_head.weight" in names
    eng = VLLMEngine(tmp_path, None, llm=FakeLLM(), sampling_params_cls=FakeSamplingParams, sleep_level=2,
                     expected_names=names)
    without_head = [(n, t) for n, t in hf_named_tensors(policy) if n != "lm_head.weight"]
    if tied:  # a tied head arrives as the embedding
        assert eng.sync_weights(without_head) == len(names) - 1
    else:
        with pytest.raises(RolloutError, match=r"1 checkpoint tensors were not streamed \(e\.g\. \['lm_head"):
            eng.sync_weights(without_head)


def test_a_plain_python_process_gets_the_launcher_variables_vllm_reads_and_torchrun_keeps_its_own():
    """vLLM's external_launcher executor reads RANK, LOCAL_RANK and an env:// rendezvous: `python
    recipes/evaluate.py` sets none of them, and would stop in vLLM with KeyError: 'RANK'."""
    from minitagpr.rollout.vllm_engine import launcher_env
    env = {}
    launcher_env(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == \
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536
    under_torchrun = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    launcher_env(env := dict(under_torchrun))
    assert env == under_torchrun


def test_a_hub_id_is_read_from_its_cached_folder_and_a_bad_one_fails_before_vllm_starts(tmp_path, monkeypatch):
    # the paper's "w/o SFT" row gives RL the base model's hub id: RL hands it to the engine as given
    import huggingface_hub.constants as hub_constants
    from minitagpr.model.checkpoint import CheckpointError
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-policy"
    policy = presets.build_model(presets.tiny_config("tiny"))  # tied head, 512 rows
    save_pretrained(policy, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, value in (("HF_HUB_CACHE", str(tmp_path / "hub")), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(hub_constants, name, value)
    eng = VLLMEngine("acme/tiny-policy", DigitTokenizer(), llm=FakeLLM(), sampling_params_cls=FakeSamplingParams)
    assert eng.expected_names == {n for n, _ in hf_named_tensors(policy)} and eng.tied
    assert len(eng.allowed_token_ids) == 500  # the folder's 512 rows were read: 12 padded rows are masked
    with pytest.raises(CheckpointError, match=r"acme/no-such-model: not a local folder and not in the Hugging Face"):
        VLLMEngine("acme/no-such-model", DigitTokenizer())  # no vllm here: raised before it is imported
