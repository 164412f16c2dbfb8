"""The whole chain pipeline on demo-world instances through the real `openai` client on 127.0.0.1:

- against a scripted fake model (stdlib server): every stage produces records, counts add up, the SFT file loads
  and tokenizes, and a rerun asks for nothing and rewrites identical files;
- against `python -m minitagpr.serve` over a tiny random checkpoint (its answers are junk, so most chains stop at
  the accuracy filter): a run killed with SIGKILL, rerun, interrupted with SIGINT, and rerun to the end repeats no
  answered request (counted from the server's request log) and ends with the same files as an uninterrupted run.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("openai")

from chains_fakes import FakeServer, ScriptedModel  # noqa: E402
from minitagpr.config import load_config  # noqa: E402
from minitagpr.data import demo_world  # noqa: E402
from minitagpr.data.chains import STAGES, ChainsConfig, run_stages  # noqa: E402
from minitagpr.tokenizer import Tokenizer  # noqa: E402
from minitagpr.train.sft_data import read_sft_records, tokenize_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("LaMP-1", "LaMP-3", "LaMP-5")
# stage -> the stage whose output it reads (for "counts add up" across stages)
UPSTREAM = {"teacher": "sample", "accuracy": "teacher", "judge": "accuracy", "explore": "judge",
            "cluster": "explore", "tag": "judge", "format": "tag", "sft": "format"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return demo_world.build(tmp_path_factory.mktemp("chains-world"), num_users=6, dev_users=2, per_user=2,
                            shared_per_user=1)


def config(out_dir, world, base_url, **overrides):
    values = {"out_dir": str(out_dir), "data.lamp_root": str(world.root), "data.tasks": ",".join(TASKS),
              "data.per_task": 2, "data.k": 3, "samples": 2, "tagging.n_clusters": 4}
    for role in ("teacher", "judge", "tagger"):
        values.update({f"{role}.base_url": base_url, f"{role}.model": f"{role}-model", f"{role}.concurrency": 2,
                       f"{role}.backoff_s": 0.05, f"{role}.timeout_s": 120})
    values.update(overrides)
    return values


def output_files(out_dir: Path) -> dict[str, bytes]:
    """Every output of the run (stage files, stats, reports), not the caches or the saved config."""
    names = [p for p in out_dir.rglob("*") if p.is_file() and "cache" not in p.parts and p.name != "config.yaml"]
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(names)}


def assert_counts_add_up(out_dir: Path, samples: int) -> dict:
    stats = {s: json.loads((out_dir / "stats" / f"{s}.json").read_text()) for s in STAGES if s != "report"}
    empty = {"in": 0, "out": 0, "dropped": {}}
    for stage, st in stats.items():
        for task in TASKS:
            row = st["tasks"].get(task, empty)
            if stage == "teacher":
                assert row["out"] == row["in"] * samples, (stage, task, row)
            else:
                assert row["in"] == row["out"] + sum(row["dropped"].values()), (stage, task, row)
            if stage in UPSTREAM:
                assert row["in"] == stats[UPSTREAM[stage]]["tasks"].get(task, empty)["out"], (stage, task)
    return stats


def scripted_model(world) -> ScriptedModel:
    """The fake endpoint, knowing every training question's gold (its teacher answers some right)."""
    golds = {}
    for task in TASKS:
        gold = world.golds(task, "train")
        golds.update({ex.input: gold[ex.id] for ex in world.examples(task, "train")})
    return ScriptedModel(golds)


def test_scripted_model_runs_every_stage_into_valid_sft_records_and_reruns_for_free(tmp_path, world):
    out = tmp_path / "out"
    with FakeServer(scripted_model(world)) as server:
        cfg = load_config(ChainsConfig, overrides=config(out, world, server.base_url))
        run_stages(cfg, log=lambda m: None)
        calls = len(server.bodies)
        first = output_files(out)
        run_stages(cfg, log=lambda m: None)  # everything answered is in the caches
        assert len(server.bodies) == calls
    assert output_files(out) == first

    stats = assert_counts_add_up(out, samples=2)
    assert sum(r["out"] for r in stats["sample"]["tasks"].values()) == 2 * len(TASKS)
    assert calls == sum(stats[s]["tasks"][t]["in"] - stats[s]["tasks"][t]["dropped"].get("outside_subset", 0)
                        for s in ("judge", "explore", "tag") for t in stats[s]["tasks"]) + 2 * 2 * len(TASKS)
    records = read_sft_records(out / "sft.jsonl")
    assert len(records) == sum(r["out"] for r in stats["sft"]["tasks"].values()) > 0
    docs = tokenize_records(records, Tokenizer.from_dir(world.tokenizer_dir), out / "sft.jsonl")
    assert all(any(d.mask) for d in docs)
    for r in records:
        assert re.fullmatch(r"(<(\w+)>[^<]+</\2>\n?){3,}", r.chain), r.chain
    for stage, st in stats.items():  # every drop but a selection is listed, with its record and reason
        counted = sum((Counter({r: n for r, n in row["dropped"].items() if r not in ("not_sampled", "outside_subset")})
                       for row in st["tasks"].values()), Counter())
        listed = out / "dropped" / f"{stage}.jsonl"
        lines = [json.loads(line) for line in listed.read_text().splitlines()] if listed.exists() else []
        assert Counter(d["reason"] for d in lines) == counted, stage
        assert len({d["id"] for d in lines}) == len(lines) and all(d["detail"] for d in lines)
    report = (out / "report.md").read_text()
    assert "| judge | LaMP-1 |" in report and "| 18 |" in report and "| make_decision |" in report
    assert f"**{len(records)} SFT chains** in sft.jsonl" in report and "`dropped/judge.jsonl`" in report
    assert "## Spot check (5 of" in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    clusters = json.loads((out / "clusters.json").read_text())
    assert 1 <= len(clusters["clusters"]) <= 4 and clusters["segments"] > 0
    assert "Not measured against SFT's seq_len" in report

    # with the policy's tokenizer: the records that fit SFT's seq_len whole, per task, as recipes/sft.py counts
    lengths = sorted(len(d.ids) for d in docs)
    seq_len = lengths[len(lengths) // 2]
    measured = load_config(ChainsConfig, overrides=config(out, world, "http://127.0.0.1:9/v1",
                                                          sft_tokenizer=str(world.tokenizer_dir), sft_seq_len=seq_len))
    run_stages(measured, ["sft", "report"], log=lambda m: None)  # no endpoint stage runs
    fit = json.loads((out / "stats" / "sft.json").read_text())["extra"]["seq_len_fit"]
    by_task = {}
    for r, d in zip(records, docs):
        row = by_task.setdefault(r.task, {"records": 0, "fit": 0, "longest": 0})
        row["records"] += 1
        row["fit"] += len(d.ids) <= seq_len
        row["longest"] = max(row["longest"], len(d.ids))
    assert fit == {"seq_len": seq_len, "tokenizer": str(world.tokenizer_dir), "tasks": by_task}
    assert 0 < sum(r["fit"] for r in by_task.values()) < len(records)  # the median splits them
    report = (out / "report.md").read_text()
    n_fit = sum(r["fit"] for r in by_task.values())
    assert f"fit SFT's seq_len={seq_len} whole" in report
    assert f"| **all** | {len(records)} | {n_fit} | {100 * n_fit / len(records):.1f}% | {lengths[-1]} |" in report


def test_a_stage_refuses_upstream_files_that_no_longer_belong_together(tmp_path, world):
    """Rerunning the judge with another threshold and then only `sft` built SFT records from chains the new judge
    had dropped, without a word; a hand-edited file was taken as its stage's output."""
    out = tmp_path / "out"
    with FakeServer(scripted_model(world)) as server:
        base = config(out, world, server.base_url)
        run_stages(load_config(ChainsConfig, overrides=base), log=lambda m: None)
        # every chain scores 18 of 20 (or is dropped already): all out
        strict = load_config(ChainsConfig, overrides={**base, "filters.min_judge_total": 18})
        run_stages(strict, ["judge"], log=lambda m: None)
        assert json.loads((out / "stats" / "judge.json").read_text())["tasks"] != {}
        with pytest.raises(ValueError, match=r"tagged\.jsonl was built from another judged\.jsonl \(it changed "
                                             r"since: stage 'judge' was rerun, or the file edited\); rerun stages "
                                             r"tag, format before 'sft'"):
            run_stages(strict, ["sft"], log=lambda m: None)
        run_stages(strict, ["tag", "format", "sft"], log=lambda m: None)  # as it says: now they belong together
        assert (out / "formatted.jsonl").read_text() == ""
        base_cfg = load_config(ChainsConfig, overrides=base)
        run_stages(base_cfg, ["judge", "tag", "format"], log=lambda m: None)  # back to the first settings (cached)
        lines = (out / "formatted.jsonl").read_text().splitlines()
        assert lines
        (out / "formatted.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # edited by hand
        with pytest.raises(ValueError, match=r"formatted\.jsonl is not the file stage 'format' wrote last .*rerun "
                                             r"stage 'format', or delete .*stats/format\.json to use the file"):
            run_stages(base_cfg, ["sft"], log=lambda m: None)
        (out / "stats" / "format.json").unlink()
        run_stages(base_cfg, ["sft"], log=lambda m: None)  # taken as it is
    assert len(read_sft_records(out / "sft.jsonl")) <= len(lines) - 1


# ---------------------------------------------------------------------------------------------------------------
# Against minitagpr.serve, with kills
# ---------------------------------------------------------------------------------------------------------------
def env():
    e = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("OPENAI_API_KEY", None)
    return e


@pytest.fixture(scope="module")
def serve(world, tmp_path_factory):
    from minitagpr.model import presets

    root = tmp_path_factory.mktemp("chains-serve")
    checkpoint = presets.make_tiny_checkpoint(root / "tiny-demo", preset="tiny", tokenizer_dir=world.tokenizer_dir)
    log = root / "requests.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "minitagpr.serve", str(checkpoint), "--port", "0",
                             "--request-log", str(log), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO)
    first_line: list[str] = []
    reader = threading.Thread(target=lambda: first_line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    match = re.search(r"at (http://\S+)", first_line[0] if first_line else "")
    if match is None:
        proc.kill()
        pytest.fail(f"minitagpr.serve did not start: {first_line}")
    yield match.group(1), log
    proc.terminate()
    proc.wait(30)


def logged(log: Path, start: int = 0, end: int | None = None) -> list[dict]:
    """The answered chat requests among the server's complete log lines [start, end) (positions count every line)."""
    lines = log.read_bytes().split(b"\n")[:-1] if log.exists() else []  # a line being appended is not complete yet
    records = [json.loads(line) for line in lines[start:end]]
    return [r for r in records if r["path"].endswith("/chat/completions") and r["status"] == 200]


def log_length(log: Path) -> int:
    """Complete lines in the server's request log."""
    return log.read_bytes().count(b"\n") if log.exists() else 0


def settled_log_length(log: Path, quiet_s: float = 3.0, deadline_s: float = 120.0) -> int:
    """The log's line count once no line has come for quiet_s, or for twice the slowest answer logged so far if that
    is longer: the server logs a request when it has answered it, so a stopped run's requests still in flight are
    logged by then (the server answers one at a time, and asks whether a queued request's client is still there)."""
    slowest = max((r["seconds"] for r in logged(log)), default=0.0)
    quiet_s = max(quiet_s, 2 * slowest)
    deadline = time.monotonic() + deadline_s
    count, changed = log_length(log), time.monotonic()
    while time.monotonic() - changed < quiet_s:
        if time.monotonic() > deadline:
            pytest.fail(f"the request log {log} kept growing for {deadline_s:.0f} s after the run stopped")
        time.sleep(0.05)
        if (now := log_length(log)) != count:
            count, changed = now, time.monotonic()
    return count


def cached_answers(out_dir: Path) -> int:
    """Complete lines (a torn tail from a kill does not count) over every stage cache."""
    return sum(p.read_bytes().count(b"\n") for p in (out_dir / "cache").glob("*.jsonl"))


def build_command(overrides: dict) -> list[str]:
    return [sys.executable, str(REPO / "recipes" / "build_chains.py")] + [f"{k}={v}" for k, v in overrides.items()]


def start_and_stop_when(overrides: dict, out_dir: Path, at_least: int, sig: int) -> subprocess.Popen:
    """Run the recipe in a child process and send `sig` once the caches hold `at_least` answers."""
    # SIGINT at its default disposition in the child, so that Python turns it into KeyboardInterrupt as a Ctrl-C would:
    # a test session started in the background of a non-interactive shell inherits SIGINT *ignored*, and the run
    # would then finish instead of stopping (exit 0, not 130; seen in fresh-clone checks started with `&`)
    proc = subprocess.Popen(build_command(overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env(),
                            cwd=REPO, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not ((out_dir / "cache").exists() and cached_answers(out_dir) >= at_least):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be stopped: {proc.stdout.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach {at_least} cached answers in 120 s")
        time.sleep(0.02)
    if proc.poll() is not None:  # it cached its last answers between two looks: nothing left to interrupt
        pytest.fail(f"the run finished before it could be stopped at {at_least} cached answers; the job is too small")
    proc.send_signal(sig)
    proc.wait(60)
    return proc


def test_killed_and_interrupted_runs_resume_without_repeating_answered_requests(tmp_path, world, serve):
    base_url, log = serve
    settings = {"teacher.max_tokens": 48, "judge.max_tokens": 48, "tagger.max_tokens": 48}

    # An uninterrupted reference run (in this process): one request per answer.
    ref_dir = tmp_path / "reference"
    at_ref = log_length(log)
    run_stages(load_config(ChainsConfig, overrides=config(ref_dir, world, base_url, **settings)), log=lambda m: None)
    reference = output_files(ref_dir)
    assert len(logged(log, at_ref)) == cached_answers(ref_dir) >= 2 * 2 * len(TASKS)
    assert_counts_add_up(ref_dir, samples=2)

    out = tmp_path / "resumed"
    overrides = config(out, world, base_url, **settings)
    at_start = log_length(log)
    killed = start_and_stop_when(overrides, out, at_least=3, sig=signal.SIGKILL)  # 1. SIGKILL mid-run
    assert killed.returncode == -signal.SIGKILL and not (out / "sft.jsonl").exists()
    # The runs are told apart by position in the log, not by clock (a wall-clock boundary after the kill failed on a
    # loaded machine): the server logs the requests the killed run left in flight after the kill, so the next run
    # starts only once the log has stopped growing, and its length then is the boundary.
    at_kill, cached_at_kill = settled_log_length(log), cached_answers(out)
    interrupted = start_and_stop_when(overrides, out, at_least=cached_at_kill + 2, sig=signal.SIGINT)  # 2. Ctrl-C
    assert interrupted.returncode == 130, interrupted.stdout.read().decode()[-2000:]
    at_int, cached_at_int = settled_log_length(log), cached_answers(out)
    finished = subprocess.run(build_command(overrides), capture_output=True, text=True, env=env(), cwd=REPO,
                              timeout=300)  # 3. rerun to the end
    # teacher.max_tokens=48 cuts every chain (the teacher's requests are the ones under test): no SFT chain, which
    # the command reports as an error once every stage's file is written
    assert finished.returncode == 1, finished.stderr[-2000:]
    assert "0 SFT chains: the accuracy stage kept none of its 12 records" in finished.stderr

    runs = {"killed": logged(log, at_start, at_kill), "interrupted": logged(log, at_kill, at_int),
            "final": logged(log, at_int)}
    sent = Counter({run: len(records) for run, records in runs.items()})
    # Ctrl-C lets the calls in flight finish into the cache: every answer that run was sent is kept.
    assert sent["interrupted"] == cached_at_int - cached_at_kill
    # SIGKILL loses at most the answers in flight (teacher.concurrency = 2); only those are ever asked again.
    lost = sent["killed"] - cached_at_kill
    first_run: dict[str, str] = {}
    repeated = []
    for run, records in runs.items():  # in log order
        for r in records:
            if r["body_sha256"] in first_run:
                repeated.append(first_run[r["body_sha256"]])
            first_run.setdefault(r["body_sha256"], run)
    assert 0 <= lost <= 2 and repeated == ["killed"] * lost
    assert len(first_run) == cached_answers(out) == cached_answers(ref_dir)
    assert output_files(out) == reference  # the same files as the uninterrupted run
