"""Processes the benchmark starts (pinned, logged to files, measured from /proc, stopped by their own PID),
the Redis it uses and the database it creates and drops."""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: var/, git
APP = {"root": ROOT}  # where the stack's processes run from: ROOT, or a snapshot of it (see snapshot_sources)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
TASKSET = shutil.which("taskset")
LOG_PROBLEM_RE = re.compile(r"Traceback|ERROR|CRITICAL|WARNING|Exception|Error:|ChannelFull|over capacity|Killed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def parse_cpus(text: str | None) -> set[int] | None:
    """ "0", "0,1", "0-3" -> a set of CPU numbers; None or "" -> None (no pinning)."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            low, high = part.split("-", 1)
            cpus.update(range(int(low), int(high) + 1))
        elif part:
            cpus.add(int(part))
    usable = os.sched_getaffinity(0)
    if not cpus <= usable:
        raise SystemExit(f"--cpus {text}: this machine offers CPUs {sorted(usable)}")
    return cpus


def cpu_list(cpus: set[int] | None) -> str:
    return ",".join(map(str, sorted(cpus))) if cpus else "any"


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; children inherit it. Returns (soft, hard)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1_048_576
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


# ------------------------------------------------------------------------------------------ /proc readers


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of the whole process (all threads, dead ones included), in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int | None:
    """A "kB" line of /proc/<pid>/status, e.g. VmRSS or VmHWM."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_open_files(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_busy_ticks(cpus: set[int] | None) -> int:
    """Busy jiffies (everything but idle and iowait) of the given CPUs, summed, from /proc/stat."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name = line.split(" ", 1)[0]
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in line.split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        total += sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    return total


def machine_busy_pct(seconds: float = 1.0) -> float:
    """How busy all CPUs are over `seconds`, in % of all of them (call it while the bench itself is idle)."""
    before = cpu_busy_ticks(None)
    time.sleep(seconds)
    return round(100 * (cpu_busy_ticks(None) - before) / CLK_TCK / seconds / (os.cpu_count() or 1), 1)


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


# ------------------------------------------------------------------------------------------------ Process


class Process:
    """A child process pinned to `cpus`, with its output in a log file; stopped by its own PID only."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cpus: set[int] | None = None):
        self.name = name
        self.cpus = cpus
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        prefix: list[str] = []
        preexec = None
        if cpus and TASKSET:
            prefix = [TASKSET, "-c", cpu_list(cpus)]  # taskset execs the command: same PID, pinned from the start
        elif cpus:
            pinned = set(cpus)

            def preexec() -> None:
                os.sched_setaffinity(0, pinned)

        self.args = prefix + args
        self.popen = subprocess.Popen(  # noqa: PLW1509 - preexec_fn only without taskset
            self.args, cwd=APP["root"], env=env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=preexec
        )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid) or 0.0

    def rss_mb(self) -> float:
        return (proc_status_kb(self.pid, "VmRSS") or 0) / 1024

    def hwm_mb(self) -> float:
        return (proc_status_kb(self.pid, "VmHWM") or 0) / 1024

    def log_text(self) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_problems(self, limit: int = 40) -> tuple[int, list[str]]:
        """How many log lines look like trouble, and the first of them with a little context."""
        lines = self.log_text().splitlines()
        hits = [i for i, line in enumerate(lines) if LOG_PROBLEM_RE.search(line)]
        excerpt: list[str] = []
        last = -1
        for i in hits:
            for j in range(max(i, last + 1), min(len(lines), i + 3)):
                excerpt.append(lines[j][:300])
                last = j
            if len(excerpt) >= limit:
                break
        return len(hits), excerpt[:limit]

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        if not self._log.closed:
            self._log.close()
        return self.popen.returncode


def wait_for_port(port: int, timeout: float, process: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.log_tail()}")
        if port_answers(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered on port {port} within {timeout} s")


def python_args(*args: str) -> list[str]:
    return [sys.executable, *args]


# -------------------------------------------------------------------------------------------------- Redis


class RedisTarget:
    """The Redis the stack uses: a database of an existing server (flushed), or a private redis-server."""

    def __init__(self, spec: str, log_dir: Path, cpus: set[int] | None):
        import redis

        self.process: Process | None = None
        if spec == "private" and shutil.which("redis-server") is None:
            spec = "redis://127.0.0.1:6379/13"
            print(f"redis-server is not installed: using {spec}", flush=True)
        if spec != "private":
            try:
                redis.Redis.from_url(spec, socket_timeout=2).ping()
                self.url = spec
                self.shared = True
            except (redis.RedisError, OSError) as exc:
                print(f"Redis at {spec} does not answer ({exc}); starting a private redis-server", flush=True)
                spec = "private"
        if spec == "private":
            server = shutil.which("redis-server")
            if server is None:
                raise SystemExit("No Redis answers and redis-server is not installed (apt-get install redis-server)")
            port = free_port()
            args = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
            self.process = Process("redis", args + ["--loglevel", "warning"], dict(os.environ), log_dir, cpus)
            wait_for_port(port, 10, self.process)
            self.url = f"redis://127.0.0.1:{port}/0"
            self.shared = False
        self.client = redis.Redis.from_url(self.url, socket_timeout=10)

    def flush(self) -> None:
        self.client.flushdb()

    def cpu_seconds(self) -> float:
        """The server's own CPU (all its clients, not only ours when it is shared)."""
        if self.process is not None:
            return self.process.cpu_seconds()
        info = self.client.info("cpu")
        return float(info.get("used_cpu_user", 0)) + float(info.get("used_cpu_sys", 0))

    def close(self) -> None:
        try:
            self.flush()
        except Exception:  # noqa: BLE001, S110 - best effort on the way out
            pass
        self.client.close()
        if self.process is not None:
            self.process.stop()


# ----------------------------------------------------------------------------------------------- database


@dataclass
class Database:
    """A fresh PostgreSQL database (created here, dropped in drop()) or a SQLite file under var/."""

    url: str
    pg_admin_url: str | None = None
    name: str | None = None  # the PostgreSQL database we created, or None
    sqlite_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, url: str | None, pg_admin_url: str, var_dir: Path) -> Database:
        if url:
            return cls(url=url, notes=[f"given DATABASE_URL {url.split('@')[-1]} (not dropped)"])
        try:
            import psycopg

            with psycopg.connect(pg_admin_url, connect_timeout=3, autocommit=True) as conn:
                name = f"chorus_bench_{os.getpid()}_{secrets.token_hex(3)}"
                conn.execute(f'CREATE DATABASE "{name}"')
            base = pg_admin_url.rsplit("/", 1)[0]
            return cls(url=f"{base}/{name}", pg_admin_url=pg_admin_url, name=name, notes=[f"PostgreSQL {name}"])
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to SQLite
            var_dir.mkdir(parents=True, exist_ok=True)
            path = var_dir / f"bench-{os.getpid()}.sqlite3"
            note = f"PostgreSQL unavailable ({str(exc).splitlines()[0][:100]}); SQLite {path}"
            return cls(url=f"sqlite:///{path}", sqlite_path=path, notes=[note])

    @property
    def kind(self) -> str:
        return "sqlite" if self.url.startswith("sqlite") else "postgresql"

    def drop(self) -> None:
        try:
            from django.db import connections

            connections.close_all()
        except Exception:  # noqa: BLE001, S110 - Django may never have been set up
            pass
        if self.name and self.pg_admin_url:
            import psycopg

            try:
                with psycopg.connect(self.pg_admin_url, connect_timeout=5, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001
                print(f"could not drop database {self.name}: {exc}", file=sys.stderr)
        if self.sqlite_path:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(str(self.sqlite_path) + suffix).unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------- stack


def stack_env(
    *, database_url: str, redis_url: str, model_url: str, secret_key: str, extra: dict[str, str]
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "chatproject.settings",
            "DEBUG": "0",
            "DJANGO_SECRET_KEY": secret_key,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "OPENAI_BASE_URL": model_url,
            "OPENAI_API_KEY": "",
            "CHORUS_EMBEDDED_WORKER": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class Stack:
    """`webs` daphnes and N agent workers, pinned to the server CPUs; started fresh for every measurement. The
    first daphne is named "daphne", the others "daphne-2", ...; clients are spread over them in turn."""

    def __init__(self, env: dict[str, str], log_dir: Path, cpus: set[int] | None, workers: int, webs: int = 1):
        self.env = env
        self.log_dir = log_dir
        self.cpus = cpus
        self.n_workers = workers
        self.n_webs = webs
        self.webs: list[Process] = []
        self.workers: list[Process] = []
        self.ports: list[int] = []
        self._turn = itertools.count()

    @property
    def daphne(self) -> Process | None:
        return self.webs[0] if self.webs else None

    @property
    def port(self) -> int:
        return self.ports[0] if self.ports else 0

    def start(self, with_workers: bool = True) -> None:
        log_dir = self.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        if with_workers:
            for i in range(self.n_workers):
                args = python_args("manage.py", "runworker", "agent-runs")
                self.workers.append(Process(f"worker-{i + 1}", args, self.env, log_dir, self.cpus))
        for i in range(self.n_webs):
            port = free_port()
            args = python_args(
                "-m", "chatproject.web", "-b", "127.0.0.1", "-p", str(port), "chatproject.asgi:application"
            )  # fmt: skip
            self.webs.append(Process("daphne" if i == 0 else f"daphne-{i + 1}", args, self.env, log_dir, self.cpus))
            self.ports.append(port)
        for port, web in zip(self.ports, self.webs, strict=True):
            wait_for_port(port, 60, web)
        for worker in self.workers:
            if not worker.alive():
                raise RuntimeError(f"{worker.name} exited with {worker.popen.returncode}:\n{worker.log_tail()}")

    @property
    def processes(self) -> list[Process]:
        return [*self.webs, *self.workers]

    def ws_url(self, conversation_id: str) -> str:
        """The next web server in turn (all of them share one origin: the check is on the host)."""
        port = self.ports[next(self._turn) % len(self.ports)]
        return f"ws://127.0.0.1:{port}/ws/conversations/{conversation_id}/"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> dict[str, float]:
        return {p.name: p.cpu_seconds() for p in self.processes}

    def dead(self) -> list[str]:
        return [f"{p.name} exited with {p.popen.returncode}" for p in self.processes if not p.alive()]

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def run_checked(args: list[str], env: dict[str, str], timeout: float, what: str) -> None:
    result = subprocess.run(args, cwd=APP["root"], env=env, capture_output=True, text=True, timeout=timeout)  # noqa: S603
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def snapshot_sources(destination: Path) -> list[str]:
    """Copy the working tree (tracked files and untracked ones git does not ignore) to `destination`, so that
    edits made while the benchmark runs do not change the code it measures halfway. Returns the copied paths."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],  # noqa: S607
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout.decode()
    copied = []
    for name in sorted(set(filter(None, listing.split("\0")))):
        source = ROOT / name
        if not source.is_file():  # deleted in the working tree
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied.append(name)
    return copied
