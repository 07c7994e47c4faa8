"""py-spy recordings of the server processes during one measurement, and where their CPU went.

``py-spy record --gil --format raw`` writes collapsed stacks ("frame;frame;... count", root first, each frame
"function (path:line)", paths relative to sys.path) of the thread holding the GIL, so the samples show where
the process's Python CPU goes (native work done without the GIL, like libpq I/O, is not seen).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

from bench.procs import Process

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PROJECT_PACKAGES = {"agents_app", "chatproject", "bench", "manage.py"}


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    sibling = Path(sys.executable).with_name("py-spy")
    return str(sibling) if sibling.exists() else None


class Recorder:
    """py-spy record on one process until stop()."""

    def __init__(self, exe: str, target: Process, output: Path, rate: int, log_dir: Path, cpus):
        self.output = output
        self.target = target
        self.rate = rate
        args = [exe, "record", "--pid", str(target.pid), "--rate", str(rate), "--format", "raw"]
        # --gil: only the thread holding the GIL is sampled. Without it, on a saturated core, threads that are
        # runnable but waiting for the CPU (woken from epoll, say) count as busy and inflate their frames.
        args += ["--output", str(output), "--nonblocking", "--gil", "--duration", "3600"]
        self.process = Process(f"py-spy-{target.name}", args, dict(os.environ), log_dir, cpus)

    def stop(self) -> dict[str, Any] | None:
        self.process.signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
        try:
            self.process.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.process.stop()
        self.process.stop()
        if not self.output.exists():
            return {"error": "py-spy wrote nothing", "log": self.process.log_tail(10)}
        return summarise(self.output, self.rate)


def frame_origin(path: str) -> str:
    """The package a frame's file belongs to ("autogen_core", "json", "agents_app", ...)."""
    head = path.split("/", 1)[0]
    name = head[:-3] if head.endswith(".py") else head
    return name or "?"


def is_stdlib(path: str) -> bool:
    return (STDLIB / path).exists() and "site-packages" not in path


def parse_frame(frame: str) -> tuple[str, str]:
    """ "function (path:line)" -> (function, path)."""
    if frame.endswith(")") and " (" in frame:
        function, _, location = frame[:-1].rpartition(" (")
        return function, location.rsplit(":", 1)[0]
    return frame, ""


def summarise(path: Path, rate: int, top: int = 20) -> dict[str, Any]:
    """Shares of the samples: by leaf function (self time), by package of the leaf, by the first library or
    project frame above the leaf (who asked for the CPU: json.dumps called by channels_redis counts as
    channels_redis), and inclusively for each package (any frame of it on the stack)."""
    total = 0
    leaf_functions: Counter[str] = Counter()
    leaf_packages: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    inclusive_functions: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [parse_frame(f) for f in stack.split(";")]
        function, file = frames[-1]
        leaf_functions[f"{function} ({file})"] += count
        leaf_packages[frame_origin(file)] += count
        owner = next(
            (frame_origin(f) for _, f in reversed(frames) if f and not is_stdlib(f)), "stdlib:" + frame_origin(file)
        )
        owners[owner] += count
        for package in {frame_origin(f) for _, f in frames if f}:
            inclusive[package] += count
        for name in {f"{fn} ({f})" for fn, f in frames}:
            inclusive_functions[name] += count

    def shares(counter: Counter[str], n: int = top) -> list[tuple[str, float]]:
        return [(name, round(100 * c / total, 1)) for name, c in counter.most_common(n)] if total else []

    return {
        "samples": total,
        "rate_hz": rate,
        "cpu_seconds_sampled": round(total / rate, 2),
        "file": str(path),
        "self_by_function_pct": shares(leaf_functions),
        "self_by_package_pct": shares(leaf_packages, 15),
        "by_calling_library_pct": shares(owners, 15),
        "inclusive_by_package_pct": shares(inclusive, 20),
        "inclusive_by_function_pct": shares(inclusive_functions, 40),
    }


def format_summary(name: str, summary: dict[str, Any], lines: int = 12) -> str:
    if not summary or "error" in summary:
        return f"{name}: no profile ({(summary or {}).get('error')})"
    out = [f"{name}: {summary['samples']} samples at {summary['rate_hz']} Hz (~{summary['cpu_seconds_sampled']} s CPU)"]
    for title, key in (
        ("by calling library (first non-stdlib frame above the leaf)", "by_calling_library_pct"),
        ("self time by function", "self_by_function_pct"),
    ):
        out.append(f"  {title}:")
        out += [f"    {pct:5.1f}%  {label}" for label, pct in summary[key][:lines]]
    return "\n".join(out)
