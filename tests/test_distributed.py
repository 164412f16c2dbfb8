"""minitagpr.distributed in one process (a process group of one, no torchrun): meta-device init + load, activation
checkpointing, DCP checkpoints, HF export. The two-process behaviour is covered by tests/test_sft_recipe.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

from minitagpr import distributed as D
from minitagpr.model import load_pretrained, presets
from minitagpr.train import optim as O


@pytest.fixture(scope="module")
def group():
    info = D.init_distributed()
    yield info
    D.destroy_distributed()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return presets.make_tiny_checkpoint(folder / "m", preset="tiny", seed=1, vocab_size=96,
                                        tie_word_embeddings=request.param)


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    return presets.make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", preset="tiny", seed=1, vocab_size=96)


def batch(seed=0, V=96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 10), generator=g)
    targets = torch.roll(ids, -1, 1)
    targets[:, :3] = -100
    return ids, targets


def sharded(path, group, ac=False):
    return D.build_sharded_causal_lm(path, group, D.device_mesh(group), activation_checkpointing=ac)


def test_single_process_group_needs_no_torchrun(group):
    assert (group.rank, group.world_size, group.backend) == (0, 1, "gloo")
    assert D.init_distributed() == group  # idempotent: a caller's group is reused


def test_meta_init_then_load_matches_the_plain_model(group, checkpoint):
    model = sharded(checkpoint, group)
    ref = load_pretrained(checkpoint)
    ids, targets = batch()
    logp, _ = model(ids, targets=targets)
    ref_logp, _ = ref(ids, targets=targets)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=0)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == ref.config.tie_word_embeddings


def test_activation_checkpointing_keeps_loss_gradients_and_names(group, checkpoint):
    ids, targets = batch(1)
    grads = []
    for ac in (False, True):
        model = sharded(checkpoint, group, ac=ac)
        logp, _ = model(ids, targets=targets)
        (-logp.sum()).backward()
        grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_round_trip_restores_weights_optimizer_and_state(group, checkpoint, tmp_path):
    ids, targets = batch(2)
    model = sharded(checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (-model(ids, targets=targets)[0].sum()).backward()
        opt.step()
    saved = D.save_checkpoint(tmp_path, 2, model, opt, {"data": {"rows": 5}})
    after_save = model(ids, targets=targets)[0].detach()
    # a fresh model and optimizer take one step from the checkpoint exactly as the original does
    opt.zero_grad()
    (-model(ids, targets=targets)[0].sum()).backward()
    opt.step()
    expected = model(ids, targets=targets)[0].detach()

    fresh = sharded(checkpoint, group)
    fresh_opt = O.build_optimizer(fresh, lr=1e-2)
    state = D.load_checkpoint(saved, fresh, fresh_opt)
    assert state == {"data": {"rows": 5}, "step": 2, "world_size": 1}
    torch.testing.assert_close(fresh(ids, targets=targets)[0].detach(), after_save, rtol=0, atol=0)
    fresh_opt.zero_grad()
    (-fresh(ids, targets=targets)[0].sum()).backward()
    fresh_opt.step()
    torch.testing.assert_close(fresh(ids, targets=targets)[0].detach(), expected, rtol=0, atol=0)


def test_keep_last_prunes_old_checkpoints_and_latest_ignores_tmp(group, tied_checkpoint, tmp_path):
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    for step in (1, 2, 3):
        D.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    (tmp_path / "step_000009.tmp").mkdir()  # a save that died before its rename
    assert [p.name for p in D.list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert D.latest_checkpoint(tmp_path).name == "step_000003"
    assert D.latest_checkpoint(tmp_path / "none") is None


def test_loading_an_incomplete_checkpoint_is_refused(group, tied_checkpoint, tmp_path):
    (tmp_path / "step_000001").mkdir()
    model = sharded(tied_checkpoint, group)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        D.load_checkpoint(tmp_path / "step_000001", model, None)


class Killed(BaseException):
    """Stands for SIGKILL at a chosen moment of a save: nothing after it runs."""


def kill_at_rename(monkeypatch, src_name):
    """The process dies when it is about to rename the folder called `src_name`."""
    real = D.os.replace

    def replace(src, dst):
        if Path(src).name == src_name:
            raise Killed(f"killed before renaming {src} -> {dst}")
        return real(src, dst)

    monkeypatch.setattr(D.os, "replace", replace)


def kill_in_rmtree(monkeypatch):
    """The process dies in its first shutil.rmtree of an existing checkpoint folder, after state.json and the first
    shard went: what is left looks like a checkpoint to a check of names only."""
    def rmtree(path, ignore_errors=False):
        path = Path(path)
        if not path.exists():
            return
        for name in ("state.json", "__0_0.distcp"):
            (path / name).unlink()
        raise Killed(f"killed while deleting {path}")

    monkeypatch.setattr(D.shutil, "rmtree", rmtree)


def test_a_resave_killed_between_its_renames_keeps_the_step(group, tied_checkpoint, tmp_path, monkeypatch):
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    D.save_checkpoint(tmp_path, 5, model, opt, {"run": "first"}, keep_last=1)
    with monkeypatch.context() as m:
        kill_at_rename(m, "step_000005.tmp")  # the new folder never gets its name
        with pytest.raises(Killed):
            D.save_checkpoint(tmp_path, 5, model, opt, {"run": "second"}, keep_last=1)
    latest = D.latest_checkpoint(tmp_path)
    assert latest is not None and D.load_checkpoint(latest, model, opt)["run"] == "first"
    D.save_checkpoint(tmp_path, 6, model, opt, {}, keep_last=2)  # a later save puts the step back under its name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005", "step_000006"]
    assert D.load_checkpoint(tmp_path / "step_000005", model, opt)["run"] == "first"


def test_a_resave_killed_while_deleting_the_folder_it_replaces_resumes(group, tied_checkpoint, tmp_path,
                                                                        monkeypatch):
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    D.save_checkpoint(tmp_path, 4, model, opt, {}, keep_last=2)
    D.save_checkpoint(tmp_path, 5, model, opt, {"run": "first"}, keep_last=2)
    with monkeypatch.context() as m:
        kill_in_rmtree(m)
        with pytest.raises(Killed):
            D.save_checkpoint(tmp_path, 5, model, opt, {"run": "second"}, keep_last=2)
    state = D.load_checkpoint(D.latest_checkpoint(tmp_path), model, opt)  # the new folder already held the name
    assert (state["step"], state["run"]) == (5, "second")
    D.save_checkpoint(tmp_path, 6, model, opt, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005", "step_000006"]


def test_a_prune_killed_midway_leaves_no_half_checkpoint_under_a_step_name(group, tied_checkpoint, tmp_path,
                                                                           monkeypatch):
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    D.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    with monkeypatch.context() as m:
        kill_in_rmtree(m)  # while step_000001 is being pruned
        with pytest.raises(Killed):
            D.save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=1)
    assert [p.name for p in D.list_checkpoints(tmp_path)] == ["step_000002"]
    D.save_checkpoint(tmp_path, 3, model, opt, {}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003"]


def test_incomplete_step_folders_are_never_resumed_and_are_named_in_the_log(group, tied_checkpoint, tmp_path,
                                                                            capsys):
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    for step in (4, 5, 6):
        D.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=0)
    (tmp_path / "step_000005" / "state.json").unlink()
    (tmp_path / "step_000006" / ".metadata").unlink()
    capsys.readouterr()
    assert D.latest_checkpoint(tmp_path).name == "step_000004"
    err = capsys.readouterr().err
    assert "step_000005 (incomplete: no state.json)" in err and "step_000006 (incomplete: no .metadata)" in err
    shutil.rmtree(tmp_path / "step_000004")
    assert D.latest_checkpoint(tmp_path) is None
    assert f"no complete checkpoint in {tmp_path}, nothing to resume from" in capsys.readouterr().err


def test_export_writes_an_hf_folder_that_loads_back(group, checkpoint, tmp_path):
    model = sharded(checkpoint, group)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    (tok_dir / "tokenizer_config.json").write_text("{}")
    (tok_dir / "chat_template.jinja").write_text("{{ messages }}")  # newer transformers keep the template apart
    out = D.export_hf(model, tmp_path / "hf", tok_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()}
    back = load_pretrained(out)
    ids, targets = batch(3)
    torch.testing.assert_close(back(ids, targets=targets)[0], model(ids, targets=targets)[0].detach(), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == model.config.tie_word_embeddings


def test_fault_point_is_inert_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv(D.FAULT_ENV, raising=False)
    D.fault_point("save", 3)  # would SIGKILL this process if armed
    monkeypatch.setenv(D.FAULT_ENV, "save:4")
    D.fault_point("save", 3)
    D.fault_point("step", 4)


_TEARDOWN_SCRIPT = """
import sys, time, torch, torch.distributed as dist
from pathlib import Path
from minitagpr import distributed as D
out = Path(sys.argv[1])
info = D.init_distributed()
x = torch.ones(2); dist.all_reduce(x)
if info.rank == 0:
    time.sleep(1.5)  # rank 0 still works while rank 1 has finished
    (out / "rank0-leaves").write_text(repr(time.time()))
D.destroy_distributed()
(out / f"rank{info.rank}-destroyed").write_text(repr(time.time()))  # files: the ranks' stdout lines interleave
"""


def _run_script(text, tmp_path, nproc=2):
    """Run `text` as a script under torchrun with `nproc` ranks, or as a plain `python` process when nproc is 0."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "script.py"
    script.write_text(text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTHONUNBUFFERED", None)  # plain python: block-buffered output into the pipes, as in CI
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"] if nproc else []
    return subprocess.run([sys.executable, *launcher, str(script), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)


_ON_MAIN_SCRIPT = """
import json, sys, threading
from pathlib import Path
import torch
from minitagpr import distributed as D
from minitagpr.model.presets import make_tiny_checkpoint
from safetensors.torch import load_file, save_file
out = Path(sys.argv[1])
info = D.init_distributed()
seen = {}

def fail():
    raise FileNotFoundError(2, "No such file or directory", "/nonexistent/stage.json")

class Unpicklable(RuntimeError):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()  # cannot be pickled

def fail_unpicklable():
    raise Unpicklable("disk full")

try:
    D.on_main(fail)
except FileNotFoundError as e:
    seen["error"] = e.filename
try:
    D.on_main(fail_unpicklable)
except RuntimeError as e:
    seen["unpicklable"] = type(e).__name__ + ": " + str(e)
seen["result"] = D.on_main(lambda: 42)
# on_every_rank: an error only rank 1 meets stops rank 0 too; each rank keeps its own result and its own error
def fail_on_rank_1():
    if info.rank == 1:
        raise ValueError("shard.jsonl, record 7, field 'id': missing")
    return "fine"
try:
    D.on_every_rank(fail_on_rank_1)
except ValueError as e:
    seen["every"] = str(e)
seen["every_result"] = D.on_every_rank(lambda: info.rank * 10)
try:
    D.on_every_rank(lambda: (_ for _ in ()).throw(KeyError(f"rank {info.rank}")))
except KeyError as e:
    seen["own"] = str(e)
# the rank helpers across two ranks
seen["sum"] = D.all_reduce_sum(torch.tensor([info.rank + 1.0])).tolist()
seen["max"] = D.all_reduce_max(torch.tensor([info.rank + 1.0, 5.0 - info.rank])).tolist()
seen["gather"] = D.gather_to_main({"rank": info.rank})
seen["broadcast"] = D.broadcast_object(f"from rank {info.rank}")
# a checkpoint only rank 0 reads, with one tensor of the wrong shape: every rank raises the loader's error
if info.is_main:
    ckpt = make_tiny_checkpoint(out / "ckpt", seed=0)
    weights = load_file(str(ckpt / "model.safetensors"))
    name = "model.norm.weight"
    weights[name] = torch.ones(weights[name].numel() + 1)
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
D.barrier()
try:
    D.build_sharded_causal_lm(out / "ckpt", info, D.device_mesh(info))
except Exception as e:
    seen["load"] = type(e).__name__ + ": " + str(e)
(out / f"rank{info.rank}.json").write_text(json.dumps(seen))
D.destroy_distributed()
D.end_process()  # as the recipes do after FSDP2 used the group (minitagpr.distributed.end_process)
"""


def test_an_error_on_rank_0_alone_is_raised_on_every_rank(tmp_path):
    """on_main: work only rank 0 does (a stage stamp, a checkpoint read for broadcast, an export) that fails there
    must stop the other ranks too, or they wait in the next collective until the group's timeout (under a launcher
    that does not kill them, e.g. srun). The error keeps its type and fields when it pickles."""
    res = _run_script(_ON_MAIN_SCRIPT, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [s["error"] for s in seen] == ["/nonexistent/stage.json"] * 2
    assert seen[0]["unpicklable"] == "Unpicklable: disk full"
    assert seen[1]["unpicklable"] == "RuntimeError: Unpicklable: disk full"
    assert [s["result"] for s in seen] == [42, None]
    assert [s["every"] for s in seen] == ["shard.jsonl, record 7, field 'id': missing"] * 2
    assert [s["every_result"] for s in seen] == [0, 10]
    assert [s["own"] for s in seen] == ["'rank 0'", "'rank 1'"]  # a failing rank raises its own error
    assert seen[0]["load"] == seen[1]["load"] and "model.norm.weight" in seen[1]["load"], seen
    # the rank helpers (pinned by mutation 2026-11-29): sum and elementwise max on every rank, gather on rank 0 only
    assert [s["sum"] for s in seen] == [[3.0], [3.0]]
    assert [s["max"] for s in seen] == [[2.0, 5.0], [2.0, 5.0]]
    assert [s["gather"] for s in seen] == [[{"rank": 0}, {"rank": 1}], None]
    assert [s["broadcast"] for s in seen] == ["from rank 0"] * 2


def test_two_ranks_meet_before_the_group_is_torn_down(tmp_path):
    """On a normal exit no rank tears the group down while another still works in it (the barrier in
    destroy_distributed): rank 1 leaves only after rank 0 has finished, and both exit 0."""
    res = _run_script(_TEARDOWN_SCRIPT, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    stamp = {name: float((tmp_path / name).read_text()) for name in ("rank0-leaves", "rank1-destroyed")}
    assert stamp["rank1-destroyed"] >= stamp["rank0-leaves"]


def test_teardown_while_an_exception_propagates_does_not_wait(monkeypatch):
    """From a `finally` block during an exception the other ranks may never arrive: no barrier there."""
    import torch.distributed as dist

    D.init_distributed()
    calls = []
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)  # pretend there are peers
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    with pytest.raises(RuntimeError, match="boom"):
        try:
            raise RuntimeError("boom")
        finally:
            D.destroy_distributed()
    assert calls == [] and not dist.is_initialized()


_END_PROCESS_SCRIPT = """
import glob, sys, torch
from pathlib import Path
from minitagpr import distributed as D
out = Path(sys.argv[1])
info = D.init_distributed()
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
from torch.distributed.fsdp import fully_shard
fully_shard(model, mesh=D.device_mesh(info))
model(torch.randn(2, 8)).sum().backward()
del model
D.destroy_distributed()
threads = sorted(Path(f).read_text().strip() for f in glob.glob("/proc/self/task/*/comm"))
(out / f"threads{info.rank}").write_text(" ".join(threads))
print(f"rank {info.rank} done", end="")  # no newline: block-buffered into the pipe, end_process must flush it
print(f"rank {info.rank} stderr", end="", file=sys.stderr)
D.end_process()
"""


@pytest.mark.parametrize("nproc", [2, 0], ids=["torchrun-2-ranks", "plain-python"])
def test_end_process_flushes_and_exits_zero_after_fsdp_teardown(tmp_path, nproc):
    """A recipe ends with destroy_distributed then end_process: exit status 0 and nothing printed is lost (plain
    python block-buffers a pipe; torchrun starts its workers unbuffered). The thread listing records why
    end_process exists: after destroy_process_group, the gloo group FSDP2 used is still alive with its threads
    (torch 2.13); they would be torn down in interpreter finalization, where a rank twice died with SIGABRT. If a
    torch upgrade makes that check fail, end_process may no longer be needed."""
    import sys
    res = _run_script(_END_PROCESS_SCRIPT, tmp_path, nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in ((0, 1) if nproc else (0,)):
        assert f"rank {rank} done" in res.stdout and f"rank {rank} stderr" in res.stderr
    if sys.platform == "linux":
        assert "pt_gloo_runloop" in (tmp_path / "threads0").read_text()


def test_more_ranks_than_gpus_is_named_before_cuda_fails(monkeypatch):
    from minitagpr.config import ConfigError

    D.check_gpu_per_rank(0, 1, 1)  # one process, one GPU: fine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("set_device reached"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"2 processes on this node but 1 CUDA device.*--nproc_per_node=1"):
        D.init_distributed()


def test_bf16_fsdp_leaves_sft_token_weights_and_prmu_scores_in_fp32(tied_checkpoint, monkeypatch):
    """FSDP's bf16 policy must not round float forward inputs (SFT's -1/N token weights) nor PRMU's logit f."""
    import minitagpr.kernels as K
    from minitagpr.model.presets import tiny_config
    from minitagpr.model.reward import PRMU

    group = D.init_distributed()  # (again: an earlier test tears the module's group down)
    seen = []
    real = K.weighted_logprob_sum
    monkeypatch.setattr(K, "weighted_logprob_sum", lambda *a, **kw: seen.append((a[0].dtype, a[3].dtype))
                        or real(*a, **kw))
    model = D.build_sharded_causal_lm(tied_checkpoint, group, D.device_mesh(group), mp_mode="bf16")
    ids, targets = batch()
    weights = (targets != -100).float() / -7.0  # -1/7 is not a bf16 number
    model(ids, targets=targets, token_weights=weights)[0].backward()
    assert seen == [(torch.bfloat16, torch.float32)]  # bf16 compute, fp32 weights

    prmu = PRMU(tiny_config("tiny", vocab_size=96), ["alice", "bob"])
    prmu.init_weights(0)
    D.shard_model(prmu, D.device_mesh(group), D.mixed_precision(group.device, "bf16"))
    f = prmu(ids, torch.tensor([10, 7]), torch.tensor([1, 2]))
    assert f.dtype == torch.float32
    assert not torch.equal(f, f.bfloat16().float())  # a bf16 score head would give exact bf16 values


def test_release_memory_frees_a_deleted_sharded_model(tied_checkpoint):
    """An FSDP2 model survives `del` (reference cycles through its hooks' state) until the cycle collector runs."""
    import weakref

    group = D.init_distributed()
    model = sharded(tied_checkpoint, group)
    ids, targets = batch()
    model(ids, targets=targets)[0].sum().backward()
    param = weakref.ref(next(model.parameters()))
    del model
    D.release_memory()
    assert param() is None


def test_a_filesystem_that_cannot_fsync_a_directory_still_checkpoints(group, checkpoint, tmp_path, monkeypatch):
    import errno
    real_fsync = os.fsync

    def no_dir_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    model = sharded(checkpoint, group)
    monkeypatch.setattr(os, "fsync", no_dir_fsync)
    D.save_checkpoint(tmp_path, 1, model, O.build_optimizer(model, lr=1e-3), {})
    assert D.latest_checkpoint(tmp_path).name == "step_000001"


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def _fake_ckpt(folder: Path, complete: bool = True) -> Path:
    """A folder that looks like a finished save to the scan (the last files exist) or like an unfinished one."""
    folder.mkdir(parents=True)
    if complete:
        for name in D.CKPT_LAST_FILES:
            (folder / name).write_text("{}")
    return folder


def test_the_checkpoint_scan_takes_an_aside_folder_only_in_place_of_a_missing_complete_step(tmp_path):
    _fake_ckpt(tmp_path / "step_000001")
    _fake_ckpt(tmp_path / ".step_000001.old")  # a stale copy beside the complete step: never preferred
    _fake_ckpt(tmp_path / ".step_000002.old", complete=False)  # an incomplete aside folder: never resumable
    _fake_ckpt(tmp_path / ".step_000003.del")  # being deleted by pruning: never a checkpoint
    _fake_ckpt(tmp_path / ".step_000004.old")  # the step's own folder is missing: this one stands in
    assert [p.name for p in D.list_checkpoints(tmp_path)] == ["step_000001", ".step_000004.old"]


def test_a_negative_step_in_state_json_is_named(group, tied_checkpoint, tmp_path):
    folder = _fake_ckpt(tmp_path / "step_000001")
    (folder / "state.json").write_text('{"step": -1}')
    from minitagpr.model.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"integer 'step' >= 0, got step -1"):
        D.load_checkpoint(folder, sharded(tied_checkpoint, group), None)


def test_the_rng_is_restored_only_from_a_checkpoint_of_the_same_world_size(group, tied_checkpoint, tmp_path):
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    D.save_checkpoint(tmp_path, 1, model, opt, {})
    state_file = tmp_path / "step_000001" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))  # saved by two ranks: their streams differ
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    D.load_checkpoint(tmp_path / "step_000001", model, opt)
    assert torch.equal(torch.rand(1), expected)  # left alone


def test_a_missing_rng_file_of_the_same_world_size_is_named(group, tied_checkpoint, tmp_path):
    """At the same world size each rank restores its RNG state; without the file a rank went on from other draws
    than the run it resumes, without a word (pinned 2026-11-29)."""
    from minitagpr.model.checkpoint import CheckpointError
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    D.save_checkpoint(tmp_path, 1, model, opt, {})
    (tmp_path / "step_000001" / "rng_rank00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step_000001: cannot resume from this checkpoint \(rng_rank00000.pt "
                                              r"missing\)"):
        D.load_checkpoint(tmp_path / "step_000001", model, opt)


def test_resume_false_killed_while_deleting_leaves_no_checkpoint_to_resume(group, tied_checkpoint, tmp_path,
                                                                           monkeypatch):
    """resume=false deleted the checkpoints under their own names: a kill midway left a step folder whose last
    files survived but not all its shards, which a restart with resume=true then chose (pinned 2026-11-29)."""
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    D.save_checkpoint(tmp_path / "ckpt", 1, model, opt, {})

    def rmtree(path, ignore_errors=False):  # dies after the first shard went; .metadata and state.json remain
        if Path(path).exists():
            next(Path(path).rglob("*.distcp")).unlink()
            raise Killed(f"killed while deleting {path}")

    with monkeypatch.context() as m:
        m.setattr(D.shutil, "rmtree", rmtree)
        with pytest.raises(Killed):
            D.checkpoint_to_resume(tmp_path / "ckpt", resume=False, tag="[test]")
    assert D.latest_checkpoint(tmp_path / "ckpt") is None
    assert D.checkpoint_to_resume(tmp_path / "ckpt", resume=False, tag="[test]") is None  # and a rerun tidies up
    assert not (tmp_path / "ckpt.stale").exists()


def test_the_resume_check_runs_on_the_saved_state_before_any_tensor_loads(group, tied_checkpoint, tmp_path):
    """load_checkpoint(check=...) sees the state before DCP reads a shard: a model of another shape is refused by the
    caller's check (what changed), not by the load (a shape mismatch reported as a damaged checkpoint to delete)."""
    from minitagpr.config import ConfigError
    from minitagpr.model.checkpoint import CheckpointError
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, 1e-3)
    folder = D.save_checkpoint(tmp_path / "ck", 1, model, opt, {"model_config": D.model_record(model.config)})
    wider = presets.make_tiny_checkpoint(tmp_path / "wider", preset="tiny", seed=1, vocab_size=128)
    other = sharded(wider, group)
    other_opt = O.build_optimizer(other, 1e-3)
    with pytest.raises(CheckpointError, match=r"cannot resume from this checkpoint \(.*[Ss]ize"):
        D.load_checkpoint(folder, other, other_opt)  # no check: the load itself fails on the shapes
    seen = []

    def check(state):
        seen.append(state["step"])
        D.check_resumed_model(state, other.config, folder, "model")
    with pytest.raises(ConfigError, match=r"model= now holds a model config other than the one this run trained "
                                          r"\(vocab_size 96 -> 128\)"):
        D.load_checkpoint(folder, other, other_opt, check=check)
    assert seen == [1]
    assert D.load_checkpoint(folder, model, opt, check=lambda s: seen.append(s["step"]))["step"] == 1 and seen == [1, 1]


def test_a_torch_without_the_fsdp2_sum_setters_is_named_before_sharding(group, tied_checkpoint, monkeypatch):
    """torch 2.6-2.8 (pyproject allowed >= 2.6) has no set_force_sum_reduction_for_comms: an AttributeError from
    inside shard_model after the blocks were sharded. Now one ConfigError names the method and the torch needed."""
    from minitagpr.config import ConfigError
    from torch.distributed.fsdp import FSDPModule
    monkeypatch.delattr(FSDPModule, "set_force_sum_reduction_for_comms")
    with pytest.raises(ConfigError, match=rf"has no FSDPModule\.set_force_sum_reduction_for_comms: .*needs torch >= "
                                          rf"{D.MIN_TORCH}"):
        sharded(tied_checkpoint, group)


# ---- pinned by mutation (2026-11-29) ------------------------------------------------------------------------------

def test_the_rank_helpers_in_a_group_of_one():
    D.init_distributed()
    assert D.gather_to_main({"rank": 0}) == [{"rank": 0}]  # a list of one, as with peers on rank 0
    t = torch.tensor([2.0, -1.0])
    assert D.all_reduce_sum(t) is t and D.all_reduce_max(t) is t and t.tolist() == [2.0, -1.0]
    assert D.broadcast_object("x") == "x"


def test_on_every_rank_raises_the_lowest_failing_ranks_error_on_a_rank_that_succeeded(monkeypatch):
    """Rank 0 succeeded; ranks 1 and 2 failed: rank 0 raises rank 1's error (a fake group of three)."""
    from types import SimpleNamespace

    def all_gather_object(out, obj):
        assert obj is None  # this rank's own result: no error
        out[:] = [None, ValueError("rank 1: record 7"), KeyError("rank 2")]

    monkeypatch.setattr(D, "dist", SimpleNamespace(is_initialized=lambda: True, get_world_size=lambda: 3,
                                                   all_gather_object=all_gather_object))
    with pytest.raises(ValueError, match="rank 1: record 7"):
        D.on_every_rank(lambda: "fine")


def test_a_checkpoint_of_step_0_loads(group, tied_checkpoint, tmp_path):
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    D.save_checkpoint(tmp_path, 0, model, opt, {})
    assert D.load_checkpoint(tmp_path / "step_000000", model, opt)["step"] == 0


def test_a_damaged_checkpoint_names_the_newest_complete_one_before_it(group, tied_checkpoint, tmp_path):
    from minitagpr.model.checkpoint import CheckpointError
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    for step in (1, 2, 3):
        D.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=0)
    (tmp_path / "step_000003" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"delete it to resume from step_000002, the newest complete"):
        D.load_checkpoint(tmp_path / "step_000003", model, opt)


def test_loading_a_checkpoint_restores_the_torch_and_python_random_streams(group, tied_checkpoint, tmp_path):
    import random
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    D.save_checkpoint(tmp_path, 1, model, opt, {})
    expected = (torch.rand(3), random.random())  # the draws the saved run makes next
    torch.manual_seed(7)
    random.seed(7)
    D.load_checkpoint(tmp_path / "step_000001", model, opt)
    after = (torch.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and after[1] == expected[1]


def test_a_new_checkpoint_name_is_made_durable_before_an_older_folder_is_deleted(group, tied_checkpoint, tmp_path,
                                                                                  monkeypatch):
    """The protocol above save_checkpoint: the rename to step_XXXXXX is fsynced (its directory) before the folder it
    replaces (.old) or a pruned one (.del) is deleted, so a power cut never leaves neither."""
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    for step in (1, 2):
        D.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    events = []
    real_fsync_path, real_rmtree = D.fsync_path, D.shutil.rmtree
    monkeypatch.setattr(D, "fsync_path", lambda p: events.append(("fsync", Path(p))) or real_fsync_path(p))
    monkeypatch.setattr(D.shutil, "rmtree", lambda p, ignore_errors=False: events.append(("rmtree", Path(p)))
                        or real_rmtree(p, ignore_errors=ignore_errors))
    D.save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=1)  # re-saves step 2 (.old) and prunes step 1 (.del)
    deleted = [i for i, (what, p) in enumerate(events) if what == "rmtree" and p.name.startswith(".step_")]
    assert {events[i][1].name for i in deleted} == {".step_000002.old", ".step_000001.del"}
    assert ("fsync", tmp_path) in events[:min(deleted)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]


# ---- failures a checkpoint's files are not to blame for; one rank's RNG file (review 2026-11-30) ------------------

def _raise(err):
    def fail(*args, **kwargs):
        raise err
    return fail


@pytest.mark.parametrize("err", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    torch.distributed.DistBackendError("NCCL error: remote process exited or there was a network error"),
    RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:63666: Connection reset by peer"),
    D.CheckpointException("read_data", {0: (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                            None)}),  # (rank 0's error, its frames)
], ids=["out-of-memory", "host-memory", "peer-gone", "peer-gone-gloo", "out-of-memory-inside-dcp"])
def test_a_load_that_runs_out_of_memory_or_loses_a_peer_raises_that_error_not_delete_advice(
        group, tied_checkpoint, tmp_path, monkeypatch, err):
    """The checkpoint may be fine: a CheckpointError advising to delete it would cost the user a good checkpoint.
    DCP's collectives raise as they are (gloo's lost peer is a plain RuntimeError); a rank's own error comes inside
    DCP's CheckpointException and is raised with its own type."""
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    folder = D.save_checkpoint(tmp_path, 1, model, opt, {})
    monkeypatch.setattr(D.dcp, "load", _raise(err))
    # the rank's own error, taken out here without the helper under test (a CheckpointException maps rank -> (error,
    # frames))
    inner = err.failures[0][0] if isinstance(err, D.CheckpointException) else err
    with pytest.raises(type(inner)) as caught:
        D.load_checkpoint(folder, model, opt)
    assert caught.value is inner


@pytest.mark.parametrize("where,err", [
    ("get_state_dict", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("set_state_dict", TypeError("a bug")),
], ids=["optimizer-state-out-of-memory", "bug-after-the-read"])
def test_failures_before_and_after_the_read_of_the_files_are_raised_as_they_are(group, tied_checkpoint, tmp_path,
                                                                                 monkeypatch, where, err):
    """Allocating the optimizer state and copying the read tensors into the model touch no file."""
    model = sharded(tied_checkpoint, group)
    opt = O.build_optimizer(model, lr=1e-3)
    folder = D.save_checkpoint(tmp_path, 1, model, opt, {})
    monkeypatch.setattr(D, where, _raise(err))
    with pytest.raises(type(err)) as caught:
        D.load_checkpoint(folder, model, opt)
    assert caught.value is err


_RNG_FILE_SCRIPT = """
import sys
from pathlib import Path
from minitagpr import distributed as D
from minitagpr.model.presets import make_tiny_checkpoint
from minitagpr.train.optim import build_optimizer
out = Path(sys.argv[1])
where = (out / "where").read_text()
info = D.init_distributed(timeout_s=60)  # a rank left waiting fails within a minute, not the default half hour
if info.is_main:
    make_tiny_checkpoint(out / "m", preset="tiny", seed=1, vocab_size=96)
D.barrier()
model = D.build_sharded_causal_lm(out / "m", info, D.device_mesh(info))
opt = build_optimizer(model, 1e-3)
real_write_synced = D.write_synced

def write_synced(path, data):  # rank 1's disk is full when it writes its RNG file
    if info.rank == 1 and path.name.startswith("rng_rank"):
        raise OSError(28, "No space left on device", str(path))
    real_write_synced(path, data)

try:
    if where == "save":
        D.write_synced = write_synced
        D.save_checkpoint(out / "ck", 1, model, opt, {})
    else:
        folder = D.save_checkpoint(out / "ck", 1, model, opt, {})
        if info.rank == 1:
            (folder / "rng_rank00001.pt").write_bytes(b"not a torch file")
        D.barrier()
        D.load_checkpoint(folder, model, opt)
    seen = "no error"
except Exception as e:
    seen = f"{type(e).__name__}: {e}"
(out / f"rank{info.rank}.txt").write_text(seen)
D.end_process()  # no teardown barrier: a rank that went on must not be released by a peer that stopped
"""


@pytest.mark.parametrize("where", ["save", "load"])
def test_an_rng_file_only_rank_1_cannot_write_or_read_stops_both_ranks(tmp_path, where):
    """Each rank writes and reads its own RNG file: a failure there on rank 1 alone (a full disk, a damaged file)
    is raised on rank 0 too, at once, instead of rank 0 going on to wait in the next collective until the group's
    timeout (or, on load, resuming while rank 1 stopped). A rank that waited would record the group's timeout (60 s in
    the script) or a lost peer, not the same error as the other: no wall-clock limit needed on a loaded machine."""
    (tmp_path / "where").write_text(where)
    res = _run_script(_RNG_FILE_SCRIPT, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    expected = {"save": r"OSError: \[Errno 28\] No space left on device: '.*/rng_rank00001.pt'",
                "load": r"CheckpointError: .*cannot resume from this checkpoint \(rng_rank00001.pt is not a saved RNG "
                        r"state"}[where]
    assert seen[0] == seen[1] and re.match(expected, seen[0]), seen
