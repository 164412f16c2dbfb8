"""Timing and peak-memory helpers shared by the benchmark scripts of this folder.

The scripts run as `python bench/X.py`, so this folder is on sys.path and they import it as `from timing import ...`.

Time
  median_seconds(fn, repeats)  calls fn `warmup` times untimed (default 1), then `repeats` timed calls; returns the
                               median wall seconds (time.perf_counter). With cpu=True it returns (median wall,
                               median process CPU seconds from time.process_time, all threads of this process): on
                               a shared machine CPU time is the steadier measure of the work, wall time also counts
                               the time other processes hold the cores. With sync (e.g. torch.cuda.synchronize) the
                               clock starts and stops on a synchronised device, so queued GPU work is counted.

Memory: different numbers, not interchangeable
  python_peak_mb(fn)           tracemalloc's peak of Python-allocated bytes during one call of fn, in MiB (2**20
                               bytes; the tables say MB). Counts what goes through Python's allocators (dicts,
                               strings, lists); native buffers an extension allocates itself, such as torch tensor
                               storage, are not counted.
  status_kib("VmRSS")          the resident set now, in KiB, from /proc/self/status (Linux).
  status_kib("VmHWM")          the resident set's high-water mark since process start or the last reset_rss_peak().
  reset_rss_peak()             returns freed heap memory to the OS (malloc_trim; otherwise a call reusing what a
                               warm-up freed shows ~0 growth), resets VmHWM to the current VmRSS (writes 5 to
                               /proc/self/clear_refs) and returns that VmRSS in KiB: the base a later VmHWM is
                               measured above.
  rss_growth_mb(fn)            CPU: calls fn once to warm up, then the resident-set growth (MiB) over a second call.
  PeakMemory(device)           peak bytes above the start of a phase: on CUDA torch.cuda.max_memory_allocated
                               (tensors of the caching allocator, not the reserved pool) minus memory_allocated at
                               start; on CPU VmHWM minus VmRSS at start (the whole process: Python, torch, libraries).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
import tracemalloc


def median_seconds(fn, repeats: int, *, warmup: int = 1, cpu: bool = False, sync=None):
    """Median wall seconds of `repeats` calls of fn after `warmup` untimed calls; (wall, CPU) medians if cpu."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if sync is not None:
            sync()
        wall0 = time.perf_counter()
        cpu0 = time.process_time() if cpu else 0.0
        fn()
        if sync is not None:
            sync()
        walls.append(time.perf_counter() - wall0)
        if cpu:
            cpus.append(time.process_time() - cpu0)
    if cpu:
        return statistics.median(walls), statistics.median(cpus)
    return statistics.median(walls)


def python_peak_mb(fn) -> float:
    """tracemalloc peak (MiB) of Python allocations during one call of fn."""
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result  # dropped after tracing stops, so nothing its teardown allocates is counted
    return peak / 2**20


def status_kib(field: str) -> int:
    """One KiB field of /proc/self/status, e.g. "VmRSS" (resident set now) or "VmHWM" (its high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def trim_heap() -> None:
    """Hand the C allocator's free memory back to the OS (glibc malloc_trim). Without it, memory a warm-up call
    freed stays resident and the next call reuses it: its resident-set growth can read ~0 however much it holds."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim with, the peak is then a lower bound
        pass


def reset_rss_peak() -> int:
    """Trim the heap, reset VmHWM to the current resident set; return that resident set (KiB), the base of a later
    peak."""
    trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


class PeakMemory:
    """Peak bytes allocated during a phase, above what was allocated when the phase began (CUDA or CPU)."""

    def __init__(self, device: str):
        self.device = "cuda" if str(device).startswith("cuda") else "cpu"  # "cuda:0" too (the current device)

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = reset_rss_peak() * 1024

    def peak(self) -> int:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return status_kib("VmHWM") * 1024 - self.base


def rss_growth_mb(fn) -> float:
    """Peak resident-set growth (MiB) over one call of fn, after a warm-up call (CPU; run it in a fresh process)."""
    fn()
    memory = PeakMemory("cpu")
    memory.start()
    fn()
    return max(0, memory.peak()) / 2**20


def child_output(argv: list[str], env: dict | None = None) -> str:
    """The last stdout line of `python *argv` run in a fresh process (a measurement that must not see this process's
    imports, caches or heap); a failure stops the bench with the child's stderr tail."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def machine_line(processes: int | None = None) -> str:
    """'machine: AMD EPYC (AVX2), no GPU, torch 2.13.0+cpu, 1 process': printed above every table, since CPU
    timings (and the last bits of results) depend on the CPU and its vector instruction set as much as on the code;
    the GPU is the one visible, whichever device the bench's arguments chose (its table says which).
    `processes`: a launcher's, what the runs it starts use (torchrun children); it then leaves CUDA alone."""
    from minitagpr.distributed import describe_machine, machine
    m = machine(gpu_name=processes is None)
    if processes is not None:
        m["processes"] = processes
    return "machine: " + describe_machine(m)
