"""Run a command and sample the RSS of its whole process tree (children, Dask workers too).

Every `interval` seconds the root process and all its descendants are read with psutil; the
result keeps, per process, its peak RSS and its peak anonymous RSS (RSS minus file-backed and
shared pages: what mmap-ing a file does not inflate), and the peak of the tree's sum.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil


@dataclass
class ProcPeak:
    pid: int
    name: str
    rss: int = 0
    anon: int = 0
    cpu_s: float = 0.0  # user + system, as last sampled (a process's last <50 ms are missed)


@dataclass
class Sampled:
    argv: list[str]
    returncode: int
    wall_s: float
    stdout: str
    stderr: str
    samples: int
    peak_sum_rss: int
    peak_sum_anon: int
    procs: list[ProcPeak] = field(default_factory=list)

    @property
    def peak_proc(self) -> ProcPeak:
        return max(self.procs, key=lambda p: p.rss, default=ProcPeak(0, "?"))

    def summary(self) -> dict[str, Any]:
        big = self.peak_proc
        return {
            "wall_s": round(self.wall_s, 3),
            "returncode": self.returncode,
            "peak_rss_largest_proc": big.rss,
            "peak_anon_largest_proc": max((p.anon for p in self.procs), default=0),
            "largest_proc": big.name,
            "peak_rss_sum": self.peak_sum_rss,
            "peak_anon_sum": self.peak_sum_anon,
            "processes": len(self.procs),
            "cpu_s": round(sum(p.cpu_s for p in self.procs), 2),
            "samples": self.samples,
            "per_process": [
                {"name": p.name, "peak_rss": p.rss, "peak_anon": p.anon, "cpu_s": round(p.cpu_s, 2)}
                for p in sorted(self.procs, key=lambda p: -p.rss)[:8]
            ],
        }


def _label(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    text = " ".join(cmd)
    if "resource_tracker" in text:
        return "resource_tracker"
    if "spawn_main" in text or "forkserver" in text or "--multiprocessing-fork" in text:
        return "dask worker (spawned)"
    return " ".join(c.rsplit("/", 1)[-1] for c in cmd[:3])[:60]


def run_sampled(
    argv: list[str],
    *,
    interval: float = 0.05,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    watch: Callable[[], bool] | None = None,
) -> Sampled:
    """`watch`, when given, is called after every sample; once it returns True the command's
    whole process group (it runs in a session of its own) is SIGKILLed, once."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=watch is not None,
    )
    root = psutil.Process(proc.pid)
    peaks: dict[int, ProcPeak] = {}
    state = {"sum": 0, "sum_anon": 0, "n": 0, "killed": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            total = total_anon = 0
            for p in tree:
                try:
                    with p.oneshot():
                        mem = p.memory_info()
                        cpu = p.cpu_times()
                except psutil.Error:
                    continue
                anon = mem.rss - getattr(mem, "shared", 0)
                peak = peaks.get(p.pid)
                if peak is None:
                    peak = peaks[p.pid] = ProcPeak(p.pid, _label(p))
                peak.rss = max(peak.rss, mem.rss)
                peak.anon = max(peak.anon, anon)
                peak.cpu_s = cpu.user + cpu.system
                total += mem.rss
                total_anon += anon
            state["sum"] = max(state["sum"], total)
            state["sum_anon"] = max(state["sum_anon"], total_anon)
            state["n"] += 1
            if watch is not None and not state["killed"] and watch():
                os.killpg(proc.pid, signal.SIGKILL)
                state["killed"] = 1
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    return Sampled(
        argv=list(argv),
        returncode=proc.returncode,
        wall_s=wall,
        stdout=out,
        stderr=err,
        samples=state["n"],
        peak_sum_rss=state["sum"],
        peak_sum_anon=state["sum_anon"],
        procs=list(peaks.values()),
    )
