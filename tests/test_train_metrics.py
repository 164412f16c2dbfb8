"""Per-step metrics: the JSONL log across resumes, the progress line, MFU, and the plot command."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from minitagpr.config import ConfigError
from minitagpr.train.metrics import JsonlLog, Progress, format_duration, mfu, peak_flops, read_jsonl
from minitagpr.train.plots import main as plots_main
from minitagpr.train.plots import numeric_keys, plot_metrics
from train_fixtures import REPO


def write_run(path, steps):
    log = JsonlLog(path)
    for s in steps:
        log.write({"step": s, "loss": 5.0 / (s + 1), "lr": 1e-3, "note": "x"})


def test_a_fresh_log_replaces_an_old_one(tmp_path):
    write_run(tmp_path / "m.jsonl", range(5))
    write_run(tmp_path / "m.jsonl", range(2))
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [0, 1]


def test_resuming_drops_steps_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    write_run(path, range(7))  # the run died after logging step 6; its last checkpoint holds 4 steps
    log = JsonlLog(path, resume_step=4)
    for s in range(4, 8):
        log.write({"step": s, "loss": 1.0})
    assert [r["step"] for r in read_jsonl(path)] == list(range(8))


def test_resuming_drops_a_line_torn_by_a_kill(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    write_run(path, range(3))
    with path.open("a") as f:
        f.write('{"step": 3, "lo')  # the process died in the middle of this write
    JsonlLog(path, resume_step=3)
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]
    assert "m.jsonl: dropped 1 line(s) that are not log records" in capsys.readouterr().err  # said, not silent


def test_resuming_drops_a_damaged_line_instead_of_failing_on_its_bytes(tmp_path, capsys):
    """A non-UTF-8 byte in the log was a UnicodeDecodeError traceback at every resume of SFT, PRMU and RL."""
    path = tmp_path / "m.jsonl"
    write_run(path, range(3))
    with path.open("ab") as f:
        f.write(b'{"step": 3, "loss": \xff}\n')
    JsonlLog(path, resume_step=5)
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]
    assert "dropped 1 line(s)" in capsys.readouterr().err


def test_a_line_that_is_not_an_object_is_named_by_the_reader_and_dropped_by_a_resume(tmp_path):
    """A list or a non-numeric step on a line was an AttributeError/TypeError deep inside (pinned 2026-11-29)."""
    path = tmp_path / "m.jsonl"
    write_run(path, range(2))
    with path.open("a") as f:
        f.write('[1, 2]\n{"step": "x"}\n')
    with pytest.raises(SystemExit, match=r"m\.jsonl:3: expected a JSON object, got list"):
        plots_main([str(path), str(tmp_path / "d.png")])
    JsonlLog(path, resume_step=2)
    assert [r["step"] for r in read_jsonl(path)] == [0, 1]


def test_log_is_silent_off_rank_zero(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl", enabled=False)
    log.write({"step": 0})
    assert not (tmp_path / "m.jsonl").exists()


def test_bad_metrics_line_is_named(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON"):
        read_jsonl(tmp_path / "m.jsonl")


def test_progress_shows_step_values_and_eta():
    out = io.StringIO()
    bar = Progress(total_steps=10, start_step=4, stream=out, every_s=0.0)
    bar.update(4, loss=2.5)
    bar.update(9, loss=1.25)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 5/10 | loss 2.5 |") and "ETA" in lines[0]
    assert lines[-1].startswith("step 10/10 | loss 1.25 |") and lines[-1].endswith("ETA 0m00s")


def test_durations_read_as_hours_minutes_seconds():
    assert format_duration(59) == "0m59s" and format_duration(3725) == "1h02m05s"


def test_mfu_is_achieved_over_peak_flops():
    assert mfu(tokens_per_s=1000, flops_per_token=6e6, world_size=2, peak_per_device=3e9) == pytest.approx(1.0)
    peak, note = peak_flops(torch.device("cpu"))
    assert peak > 0 and "CPU: assumed" in note


def test_plot_writes_a_png_with_one_panel_per_key(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    # PNG bytes alone would pass with swapped axes or one key's values in every panel: record what each panel drew
    drawn = []
    real_plot = Axes.plot

    def recording_plot(ax, x, y, *args, **kwargs):
        drawn.append((ax, list(x), list(y)))
        return real_plot(ax, x, y, *args, **kwargs)
    monkeypatch.setattr(Axes, "plot", recording_plot)
    write_run(tmp_path / "m.jsonl", range(6))
    out = plot_metrics(tmp_path / "m.jsonl", tmp_path / "plots" / "m.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = {ax.get_title(): (x, y) for ax, x, y in drawn}  # a panel's title is its key
    assert len(drawn) == len(panels) == 2  # loss and lr; not the string "note", not "step"
    steps = list(range(6))
    assert panels["loss"] == (steps, [5.0 / (s + 1) for s in steps])  # write_run's values, against the steps
    assert panels["lr"] == (steps, [1e-3] * 6)


def test_plot_draws_keys_that_first_appear_after_the_first_step():
    records = [{"step": 1, "loss": 1.0, "note": "x"}, {"step": 2, "loss": 0.5, "reward_mean/LaMP-7": 0.2, "ok": True}]
    assert numeric_keys(records) == ["loss", "reward_mean/LaMP-7"]  # not step, strings or bools


def test_plot_names_unknown_keys(tmp_path):
    write_run(tmp_path / "m.jsonl", range(3))
    with pytest.raises(KeyError, match="no record has the key.s. reward"):
        plot_metrics(tmp_path / "m.jsonl", tmp_path / "m.png", keys=["loss", "reward"])


def test_plot_command_line(tmp_path):
    write_run(tmp_path / "m.jsonl", range(4))
    proc = subprocess.run([sys.executable, "-m", "minitagpr.train.plots", str(tmp_path / "m.jsonl"),
                           str(tmp_path / "c.png"), "--keys", "loss"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_plot_command_names_a_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="none.jsonl does not exist"):
        plots_main([str(tmp_path / "none.jsonl"), str(tmp_path / "d.png")])


def test_plot_command_names_folders_given_as_files_and_writes_any_suffix(tmp_path):
    """A folder as the metrics file or as the output is named as a folder (it read "does not exist", and the output
    "Format 'tmp' is not supported"); a name without a suffix gets a PNG, a PDF suffix a PDF, an unknown one a
    one-line error; nothing is left beside the output."""
    write_run(tmp_path / "m.jsonl", range(3))
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(SystemExit, match=f"metrics file {tmp_path / 'a_dir'} is a folder, not a file"):
        plots_main([str(tmp_path / "a_dir"), str(tmp_path / "d.png")])
    with pytest.raises(SystemExit, match=f"output {tmp_path / 'a_dir'} is a folder; give a file path"):
        plots_main([str(tmp_path / "m.jsonl"), str(tmp_path / "a_dir")])
    plots_main([str(tmp_path / "m.jsonl"), str(tmp_path / "curves")])
    assert (tmp_path / "curves").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots_main([str(tmp_path / "m.jsonl"), str(tmp_path / "curves.PDF")])
    assert (tmp_path / "curves.PDF").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(SystemExit, match="error: Format 'xyz' is not supported"):
        plots_main([str(tmp_path / "m.jsonl"), str(tmp_path / "c.xyz")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "curves", "curves.PDF", "m.jsonl"]


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, peak", [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA H20", 148e12), ("NVIDIA B200", 2250e12),
                                        ("NVIDIA GB200", 2500e12), ("AMD Instinct MI300X", 1307e12)])
def test_gpu_peaks_match_the_most_specific_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0))[0] == peak


def test_the_cpu_peak_scales_with_the_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert peak_flops(torch.device("cpu"))[0] == 3 * 50e9


def test_plots_use_the_logged_step_and_skip_flags_and_times(tmp_path, monkeypatch):
    """A resumed log starts at its own step; booleans and elapsed time are not curves."""
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: drawn.append(list(x)))
    log = tmp_path / "m.jsonl"
    log.write_text("".join(f'{{"step": {s}, "loss": 1.0, "ok": true, "elapsed_s": 3.0}}\n' for s in (11, 12, 13)))
    plot_metrics(log, tmp_path / "m.png")
    assert drawn == [[11, 12, 13]]  # one panel (loss), at the logged steps


def test_an_unknown_gpu_says_what_it_assumed_and_the_environment_overrides_the_table(monkeypatch):
    """A card the table lacks was measured against an A100 with only a note (a B200's MFU read ~7x too high):
    the note names MINITAGPR_PEAK_TFLOPS, which sets any device's peak."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Future GPU X1")
    peak, note = peak_flops(torch.device("cuda", 0))
    assert peak == 312e12 and "unknown GPU" in note and "MINITAGPR_PEAK_TFLOPS" in note
    monkeypatch.setenv("MINITAGPR_PEAK_TFLOPS", "1500")
    assert peak_flops(torch.device("cuda", 0)) == (1500e12, "MINITAGPR_PEAK_TFLOPS: 1500 TFLOP/s per device")
    assert peak_flops(torch.device("cpu"))[0] == 1500e12
    monkeypatch.setenv("MINITAGPR_PEAK_TFLOPS", "fast")
    with pytest.raises(ConfigError, match="MINITAGPR_PEAK_TFLOPS='fast': expected a number of TFLOP/s > 0"):
        peak_flops(torch.device("cpu"))


# ---- pinned by mutation (2026-11-29) -----------------------------------------------------------------------

def test_resuming_drops_a_line_whose_step_is_not_a_number(tmp_path):
    path = tmp_path / "m.jsonl"
    write_run(path, range(2))
    with path.open("a") as f:
        f.write('{"step": true, "loss": 1.0}\n')  # JSON's true is no step (Python would read it as 1)
    JsonlLog(path, resume_step=2)
    assert [r["step"] for r in read_jsonl(path)] == [0, 1]


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_a_peak_that_is_not_a_positive_number_is_refused(monkeypatch, value):
    monkeypatch.setenv("MINITAGPR_PEAK_TFLOPS", value)
    with pytest.raises(ValueError, match="expected a number of TFLOP/s > 0"):
        peak_flops(torch.device("cpu"))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_progress_times_the_steps_of_this_run_and_estimates_the_rest(monkeypatch):
    """A resumed run (start_step=4 of 10) that took 20 s for steps 5 and 6: 10 s/step, 4 steps (40 s) to go."""
    clock = FakeClock()
    monkeypatch.setattr("minitagpr.train.metrics.time", clock)
    out = io.StringIO()
    bar = Progress(total_steps=10, start_step=4, stream=out, every_s=0.0)
    clock.now = 20.0
    bar.update(5, loss=1.0)
    assert out.getvalue() == "step 6/10 | loss 1 | 10.00 s/step | elapsed 0m20s | ETA 0m40s\n"


def test_progress_in_a_file_prints_every_every_s_and_always_the_last_step(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("minitagpr.train.metrics.time", clock)
    out = io.StringIO()
    bar = Progress(total_steps=3, stream=out, every_s=60.0)
    for step in range(3):
        clock.now += 1.0
        bar.update(step, loss=1.0)
    assert [line.split(" |")[0] for line in out.getvalue().splitlines()] == ["step 1/3", "step 3/3"]


def test_progress_on_a_terminal_redraws_one_line_and_ends_it_at_the_last_step():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = Progress(total_steps=2, stream=out, every_s=60.0)
    bar.update(0, loss=1.0)
    assert out.getvalue().startswith("\rstep 1/2 |") and "\n" not in out.getvalue()
    bar.update(1, loss=1.0)
    assert out.getvalue().count("\r") == 2 and out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1
