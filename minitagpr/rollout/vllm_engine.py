"""vLLM adapter: one colocated `vllm.LLM` per torchrun rank, fed new weights from the (FSDP2) policy in-process.

Only imported when vllm is installed (GPU machines); `hf_named_tensors` and the adapter's state machine are plain
Python and tested on CPU with a recording fake in place of `vllm.LLM`.

Lifecycle of one RL step (the order matters):
  generate()   -> vLLM samples; afterwards the engine sleeps (level 2 frees weights *and* KV cache, level 1
                  offloads weights to CPU) so the trainer gets the GPU memory back
  sync_weights(hf_named_tensors(policy))
               -> wake_up(tags=["weights"])   re-allocate weight memory only (no KV cache yet: lower peak memory)
               -> worker_model.load_weights(stream of (HF name, full tensor))   overwrite *every* parameter
               -> wake_up(tags=["kv_cache"])
               -> reset_prefix_cache()        cached prefixes were computed with the old weights
  generate()   ...
We never call vLLM's `reload_weights`: after level-2 sleep it re-reads the original checkpoint from disk and
silently undoes training (TRL #5312); the full stream from the policy is the only source of weights. A generate()
after level-2 sleep without a sync is refused for the same reason (the woken weight memory holds garbage).

Needs vLLM >= 0.8.5: level-2 sleep discards the non-weight buffers too (RoPE's cos/sin tables), which wake_up
restores only since vLLM PR #16889 (2025-04-21); before it every step after the first decoded with garbage tables.

Requests mean what they mean for the built-in engine: completions stop on the given stop ids only (ignore_eos, so
not also on the EOS ids vLLM reads from the tokenizer and generation_config.json); greedy n > 1 is one request copied
n times (vLLM refuses it); temperatures vLLM would silently clamp (0 < T < 0.01) or refuses (T > 2) are refused here
by name; a request vLLM aborts is an error, not a completion cut by the length limit.

Log-probs: vLLM's default (`raw_logprobs`) reports log-probs at temperature 1, before any processing; they equal
the built-in engine's only at T = 1 (the paper's setting). The RL loop only logs their gap to the policy's own
log-probs (rollout/logp_gap_*), and only at T = 1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from minitagpr.model.checkpoint import resolve_checkpoint

from .base import Completion, RolloutEngine, RolloutError, check_request, hf_name, prompt_seed_keys, sample_seed


def hf_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of `model` once, under its HF checkpoint name, as a full tensor.

    A tied head is the embedding parameter, so `named_parameters()` yields it once (as `model.embed_tokens.weight`)
    and vLLM's Qwen3 loader ties it itself. FSDP2 parameters are DTensors: `full_tensor()` all-gathers, which is a
    collective, so every rank must consume this iterator in the same order."""
    for name, param in model.named_parameters():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()  # (full shape) gathered from every rank's shard
        yield hf_name(name), tensor


def checkpoint_tensor_names(checkpoint_dir: str | os.PathLike) -> set[str]:
    """Tensor names of an HF safetensors checkpoint, read from its index or its single file's header (validated as
    a load validates them: a truncated file or a broken index is a RolloutError naming the file)."""
    from minitagpr.model.checkpoint import CheckpointError, tensor_names

    try:
        return tensor_names(Path(checkpoint_dir))
    except CheckpointError as err:
        raise RolloutError(f"cannot read the parameter names vLLM will load: {err}") from None
    except OSError as err:  # e.g. no permission to read the file
        raise RolloutError(f"cannot read the parameter names vLLM will load: {err.filename or checkpoint_dir}: "
                           f"{err.strerror or err}") from None


def _config_field(checkpoint_dir, name: str):
    """One field of the checkpoint's config.json, or None when there is no readable config or no such field."""
    try:
        return json.loads((Path(checkpoint_dir) / "config.json").read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None


def _config_vocab_size(checkpoint_dir) -> int | None:
    """The embedding rows of the checkpoint (config.json vocab_size), or None when there is no readable config."""
    try:
        return int(_config_field(checkpoint_dir, "vocab_size"))
    except (ValueError, TypeError):
        return None


def launcher_env(environ=os.environ) -> None:
    """The torchrun variables vLLM's "external_launcher" executor reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), set for a process of one when no launcher set them: `python recipes/evaluate.py` and
    `python recipes/prmu_rollouts.py` run without torchrun. Under torchrun nothing is changed."""
    if "RANK" in environ:
        return
    import socket
    with socket.socket() as s:  # a free port for vLLM's group of one (nobody else joins it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)})


VLLM_MIN_TEMPERATURE = 1e-2  # vLLM clamps 0 < T < 0.01 up to 0.01 (with a log warning only)
VLLM_MAX_TEMPERATURE = 2.0  # vLLM >= 0.11 refuses T > 2


def temperature_problem(temperature: float) -> str | None:
    """Why the vLLM engine cannot sample at `temperature` (None when it can): vLLM raises above 2 (recent versions)
    and silently samples at 0.01 below it, another distribution than the one asked for."""
    if temperature != 0 and not VLLM_MIN_TEMPERATURE <= temperature <= VLLM_MAX_TEMPERATURE:
        return (f"temperature {temperature!r}: the vLLM engine samples at 0 (greedy) or in "
                f"[{VLLM_MIN_TEMPERATURE:g}, {VLLM_MAX_TEMPERATURE:g}]; use engine: builtin for others")
    return None


def _finish_reason(vllm_reason, ids: list[int], stops: list[int], prompt_index: int, max_new_tokens: int) -> str:
    """Our finish reason from vLLM's: "stop" exactly when the last id is one of ours (the completion's contract),
    "length" when vLLM ran out of max_tokens; an aborted or failed request is an error, never a short completion
    that would be scored as cut by the length limit (vLLM also says "length" when a sequence reaches max_model_len,
    which generate() rules out up front)."""
    if ids and ids[-1] in stops:
        return "stop"  # also when the stop id is the last allowed token: vLLM checks the length first ("length")
    if vllm_reason == "length" and len(ids) == max_new_tokens:
        return "length"
    raise RolloutError(f"vLLM finished prompt {prompt_index}'s completion with finish_reason={vllm_reason!r} "
                       f"after {len(ids)} tokens, not on a stop id nor at max_new_tokens={max_new_tokens}")


def _worker_model(llm) -> torch.nn.Module:
    """The torch module inside vLLM's in-process worker (external_launcher keeps the engine core in this process)."""
    engine = llm.llm_engine
    executor = getattr(engine, "model_executor", None)
    if executor is None and hasattr(engine, "engine_core"):
        executor = engine.engine_core.engine_core.model_executor
    if executor is None:
        raise RolloutError("cannot reach vLLM's worker model: is VLLM_ENABLE_V1_MULTIPROCESSING=0 set?")
    return executor.driver_worker.worker.model_runner.model


class VLLMEngine(RolloutEngine):
    """A colocated vLLM engine behind the rollout interface.

    checkpoint_dir: HF checkpoint folder (config.json, safetensors, tokenizer files) vLLM starts from.
    tokenizer: our Tokenizer for completion text and the sampleable vocabulary. None (throughput benches only):
        vLLM's detokenised text, which may end in the stop id's text when that id was the last allowed token, and
        no mask of a padded embedding tail.
    sleep_level: what happens after each generate. 1 (default) offloads weights to CPU and frees the KV cache:
        safe for inference-only use. 2 frees weights and KV cache, and the next generate needs a sync_weights
        first: the RL loop's setting (it syncs every step anyway, and saves the CPU copy). 0 never sleeps.
    seed: vLLM's engine seed (per rank); per-request seeds below make results independent of batching anyway.
    llm / sampling_params_cls: inject a ready `vllm.LLM` and `vllm.SamplingParams` (tests pass recording fakes).
    """

    def __init__(self, checkpoint_dir, tokenizer=None, *, sleep_level: int = 1, gpu_memory_utilization: float = 0.3,
                 max_model_len: int = 4096, dtype: str = "bfloat16", seed: int = 0,
                 expected_names: set[str] | None = None, llm=None, sampling_params_cls=None, **llm_kwargs):
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1 or 2, got {sleep_level}")
        # a hub id ("Qwen/Qwen3-8B", the paper's "w/o SFT" policy) names the cached folder our own loader reads; the
        # checkpoint's names and sizes are read before vLLM starts, so a bad folder fails in seconds, not minutes
        if llm is None or expected_names is None:  # (an injected llm with its names, as in tests, reads no folder)
            checkpoint_dir = resolve_checkpoint(checkpoint_dir)
        self.expected_names = expected_names if expected_names is not None else checkpoint_tensor_names(checkpoint_dir)
        # a tied head arrives as the embedding; an untied model's head must be streamed like every other tensor
        self.tied = _config_field(checkpoint_dir, "tie_word_embeddings") is True
        # Never sample ids the tokenizer cannot decode (Qwen3's padded embedding tail, vLLM #13175). One list,
        # built once and shared by every request's SamplingParams (151,669 ids for Qwen3).
        rows = _config_vocab_size(checkpoint_dir)
        self.allowed_token_ids = (list(range(tokenizer.vocab_size))
                                  if tokenizer is not None and (rows is None or tokenizer.vocab_size < rows) else None)
        if llm is None:
            # The engine core must live in this process so sync_weights can reach the worker's model.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            launcher_env()  # the external launcher expects torchrun's variables, also in a plain `python` process
            from vllm import LLM, SamplingParams

            llm = LLM(model=str(checkpoint_dir), tokenizer=str(checkpoint_dir), dtype=dtype, seed=seed,
                      tensor_parallel_size=1, distributed_executor_backend="external_launcher",
                      enable_sleep_mode=sleep_level > 0, gpu_memory_utilization=gpu_memory_utilization,
                      max_model_len=max_model_len, enable_prefix_caching=True, **llm_kwargs)
            sampling_params_cls = SamplingParams
        if sampling_params_cls is None:
            raise ValueError("an injected llm needs its sampling_params_cls")
        self.llm = llm
        self.max_model_len = max_model_len
        self.SamplingParams = sampling_params_cls
        self.tokenizer = tokenizer
        self.sleep_level = sleep_level
        self.asleep: set[str] = set()  # which of {"weights", "kv_cache"} vLLM has released
        self.weights_valid = True  # False after level-2 sleep until a full sync

    # -- memory --------------------------------------------------------------------------------------------------------

    def sleep(self) -> None:
        if self.sleep_level == 0 or self.asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = {"weights", "kv_cache"}
        self.weights_valid = self.sleep_level == 1  # level 1 keeps a CPU copy; level 2 discards the weights

    def wake_up(self) -> None:
        """Re-allocate weights, then KV cache. After level-2 sleep the weights stay invalid until sync_weights."""
        for tag in ("weights", "kv_cache"):
            if tag in self.asleep:
                self.llm.wake_up(tags=[tag])
                self.asleep.discard(tag)

    # -- weights -------------------------------------------------------------------------------------------------------

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Stream (HF name, full tensor) pairs into vLLM's worker model, in the order that never reloads from disk."""
        if "weights" in self.asleep:
            self.llm.wake_up(tags=["weights"])  # memory for the weights must exist before we write into it
            self.asleep.discard("weights")
        streamed: list[str] = []

        def stream():
            for name, tensor in named_tensors:
                name = hf_name(name)  # callers may stream wrapped names straight from named_parameters()
                streamed.append(name)
                yield name, tensor

        _worker_model(self.llm).load_weights(weights=stream())
        missing = self.expected_names - set(streamed) - ({"lm_head.weight"} if self.tied else set())
        if missing:
            raise RolloutError(f"sync_weights: {len(missing)} checkpoint tensors were not streamed "
                               f"(e.g. {sorted(missing)[:3]}); vLLM would sample with stale or garbage weights")
        self.weights_valid = True
        if "kv_cache" in self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep.discard("kv_cache")
        self.llm.reset_prefix_cache()  # cached prefix KV was computed by the previous weights
        return len(streamed)

    # -- generation ----------------------------------------------------------------------------------------------------

    def generate(self, prompt_token_ids, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256, stop_token_ids=None,
                 seed=0) -> list[list[Completion]]:
        vocab_limit = 2**31 - 1  # vLLM checks prompt ids against its own vocabulary
        # vLLM would cut a completion at max_model_len and call it "length": refused up front instead
        stops = check_request(prompt_token_ids, n, temperature, top_p, max_new_tokens, stop_token_ids, vocab_limit,
                              max_len=("the engine's max_model_len", self.max_model_len))
        if why := temperature_problem(temperature):
            raise RolloutError(why)
        if not self.weights_valid:
            raise RolloutError("generate after level-2 sleep needs sync_weights first: the weights were discarded "
                               "and reloading them from disk would undo training")
        self.wake_up()
        keys = prompt_seed_keys(seed, len(prompt_token_ids))  # (base, index) per prompt
        extra = {}
        if self.allowed_token_ids is not None:
            extra["allowed_token_ids"] = self.allowed_token_ids
        if self.tokenizer is not None:
            extra["detokenize"] = False  # we decode with our tokenizer below
        # Greedy decoding has one answer and vLLM refuses n > 1 at temperature 0: ask once, copy it n times below.
        n_asked = 1 if temperature == 0 else n
        # ignore_eos: stop on `stops` only, as the built-in engine does; otherwise vLLM also stops on the tokenizer's
        # EOS and on every eos_token_id of the checkpoint's generation_config.json.
        params = [
            self.SamplingParams(n=n_asked, temperature=float(temperature), top_p=float(top_p),
                                max_tokens=max_new_tokens, stop_token_ids=stops, ignore_eos=True,
                                seed=sample_seed(*keys[i], 0) % (2**31), logprobs=0, skip_special_tokens=False,
                                **extra)
            for i in range(len(prompt_token_ids))
        ]
        prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompt_token_ids]  # numpy ints too
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)

        groups = []
        for i, request in enumerate(outputs):
            group = []
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                logprobs = [float(step[t].logprob) for step, t in zip(out.logprobs, ids)]
                reason = _finish_reason(out.finish_reason, ids, stops, i, max_new_tokens)
                if self.tokenizer is not None:
                    text = self.tokenizer.decode(ids[:-1] if reason == "stop" else ids)
                else:
                    text = out.text
                group.append(Completion(token_ids=ids, text=text, logprobs=logprobs, finish_reason=reason))
            if n_asked == 1 and n > 1 and len(group) == 1:
                group += [Completion(token_ids=list(group[0].token_ids), text=group[0].text,
                                     logprobs=list(group[0].logprobs), finish_reason=group[0].finish_reason)
                          for _ in range(n - 1)]
            if len(group) != n:
                raise RolloutError(f"vLLM returned {len(group)} completions for prompt {i}, expected n={n}")
            groups.append(group)
        if len(groups) != len(prompt_token_ids):
            raise RolloutError(f"vLLM returned {len(groups)} groups for {len(prompt_token_ids)} prompts")
        self.sleep()
        return groups
