"""Per-step metrics: a JSONL log (one object per optimizer step), a rank-0 progress line with ETA, and MFU.

MFU = achieved model FLOP/s / peak FLOP/s, with achieved = the step's FLOPs / its seconds: every non-pad input token
at `model.flops_per_token(n, head=False)` for the length n of its own document or sequence (6N of the decoder plus
the attention term, forward + backward; `sft_data.row_flops`, `rl.loop.pass_flops`) + target tokens x
`model.head_flops_per_token()` (the fused log-prob kernels run the head only there), over all ranks, and the peak
from the table below (dense bf16 tensor-core numbers for GPUs).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from minitagpr.atomic import atomic_write_text
from minitagpr.config import ConfigError

if TYPE_CHECKING:
    import torch

# Dense bf16 peak FLOP/s per device (datasheet, without sparsity), by a substring of torch.cuda.get_device_name()
# (first match wins: "H200" before "H20", "GB200" before "B200"). MINITAGPR_PEAK_TFLOPS overrides the table.
GPU_PEAK_FLOPS = [
    ("GB200", 2500e12), ("B200", 2250e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
    ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12), ("V100", 125e12), ("MI300X", 1307e12),
    ("MI325X", 1307e12), ("MI250X", 383e12),
]
PEAK_ENV = "MINITAGPR_PEAK_TFLOPS"  # one device's dense bf16 peak in TFLOP/s, for a card the table lacks
# CPU assumption (order of magnitude only): one core with AVX2/AVX-512 FMA at ~2.5 GHz sustains ~50 GFLOP/s fp32.
CPU_PEAK_FLOPS_PER_THREAD = 50e9


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    import torch  # here, so the plot command starts without importing torch
    if os.environ.get(PEAK_ENV):
        try:
            flops = float(os.environ[PEAK_ENV]) * 1e12
        except ValueError:
            flops = math.nan
        if not (math.isfinite(flops) and flops > 0):
            raise ConfigError(f"{PEAK_ENV}={os.environ[PEAK_ENV]!r}: expected a number of TFLOP/s > 0")
        return flops, f"{PEAK_ENV}: {flops / 1e12:g} TFLOP/s per device"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops, f"{name}: {flops / 1e12:.0f} TFLOP/s dense bf16"
        return 312e12, (f"{name}: unknown GPU, assuming A100's 312 TFLOP/s (set {PEAK_ENV} to its dense bf16 "
                        f"peak for a true MFU)")
    threads = torch.get_num_threads()
    return threads * CPU_PEAK_FLOPS_PER_THREAD, (f"CPU: assumed {CPU_PEAK_FLOPS_PER_THREAD / 1e9:.0f} GFLOP/s per "
                                                 f"thread x {threads} thread(s)")


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation of the whole job (tokens_per_s summed over all ranks)."""
    return tokens_per_s * flops_per_token / (world_size * peak_per_device)


def _step_of(line: str) -> float:
    """The step of a log line; a blank or torn line (a kill mid-write) sorts after every step, so it is dropped."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return float("inf")
    if not isinstance(record, dict):  # not one of our records: dropped like a torn line
        return float("inf")
    step = record.get("step", -1)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else float("inf")


class JsonlLog:
    """Append one JSON object per step to `path` (rank 0 only; a no-op elsewhere).

    `resume_step=s` first drops lines with step >= s, written by a run that died after its last checkpoint, so a
    resumed run's log holds every step exactly once. Each write opens, appends one line and closes: steps are
    seconds apart, and a run that stops on an exception leaves no open file behind."""

    def __init__(self, path: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            # decoded line by line: a bad byte (our lines are ASCII JSON) makes that line unreadable, not the log
            lines = [raw.decode("utf-8", errors="replace") for raw in self.path.read_bytes().splitlines()]
            steps = [_step_of(line) for line in lines]
            kept = [line for line, step in zip(lines, steps) if step < resume_step]
            if torn := sum(step == float("inf") and line.strip() != "" for line, step in zip(lines, steps)):
                print(f"{self.path}: dropped {torn} line(s) that are not log records (torn or damaged writes)",
                      file=sys.stderr, flush=True)
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))  # a kill here keeps the old log
        self.path.touch()

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a metrics file; a line that is not a JSON object is named (file:line)."""
    from minitagpr.data.lamp import json_object_lines
    path = Path(path)
    if not path.is_file():
        why = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"metrics file {path} {why}")
    return [record for _, record in json_object_lines(path, lambda i, what: ValueError(f"{path}:{i}: {what}"))]


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """A one-line progress report with ETA on rank 0: redrawn in place on a terminal, a plain line every
    `every_s` seconds (and at the last step) when the output is a file or pipe."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, stream=None, every_s: float = 10.0,
                 prefix: str = ""):
        self.total, self.start, self.enabled = total_steps, start_step, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s, self.prefix = every_s, prefix
        self.t0 = time.perf_counter()
        self._last_print = -float("inf")

    def update(self, step: int, **values: float) -> None:
        """Report that optimizer step `step` (0-based) has finished."""
        if not self.enabled:
            return
        done = step + 1 - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        fields = " | ".join(f"{k} {v:.4g}" for k, v in values.items())
        line = (f"{self.prefix}step {step + 1}/{self.total} | {fields} | {elapsed / max(done, 1):.2f} s/step | "
                f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}")
        now = time.perf_counter()
        last = step + 1 >= self.total
        if self.tty:
            self.stream.write("\r" + line + ("\n" if last else ""))
            self.stream.flush()
        elif last or now - self._last_print >= self.every_s:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_print = now
