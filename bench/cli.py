"""``python -m bench``: Chorus's streaming benchmark (issue 5). docs/performance.md has the latest numbers.

It starts the real stack as processes (Redis, the offline model server, daphnes, N agent workers), pins the
server processes to ``--cpus`` and the model server and the clients to the other CPUs, and for each K:

1. the floor: K clients stream T stamped tokens at R tokens/s straight from the model server (OpenAI client);
2. a fresh daphne and workers, warmed with one short run per worker;
3. K logged-in WebSocket clients connect, wait for ``hello``, all send ``[[stamp]] [[tokens:T]] [[tps:R]]`` at
   once, and read until ``run.finished``: per-token delivery latency (arrival minus the model server's stamp),
   time to first token from ``send``, tokens lost / duplicated / out of order, failed and timed-out runs;
4. the server processes' CPU (/proc utime+stime) per streamed token and their peak memory (VmHWM).

``--idle N`` holds N authenticated idle sockets on one daphne; ``--runs-per-second`` measures how fast one
worker starts and finishes runs whose model replies at once. Every process is stopped by its PID at the end,
and the bench database is dropped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import clients, procs
from bench.stats import distribution, fmt, token_report


def measure(phase):
    """Run a measured phase of clients with the bench's own garbage collector paused. A full collection of the
    heap the earlier phases left stalls every client for 100-500 ms (seen as `client_loop_lag_ms` max 165 ms
    at K = 150 and 461 ms at K = 500 in one run), and every token arriving meanwhile looks late: that is the
    bench's delay, not the servers'. What a phase allocates is freed when the collector is back on."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return asyncio.run(phase)
    finally:
        gc.enable()
        gc.unfreeze()


DEFAULT_KS = "1,10,50,100,200,500"
BENCH_STALL_MS = 50  # a client loop late by more than this marks the row: its latencies may be the bench's
RPS_CONTENT = "[[tps:0]] [[tokens:1]]"
WARMUP_CONTENT = "[[tokens:5]] [[tps:0]]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Chorus's streaming benchmark: the real stack as processes, K concurrent WebSocket clients.",
        epilog="Example: python -m bench --k 1,10,50,100,200,500 --tokens 200 --tps 30 --cpus 0 --out var/bench.json",
    )
    parser.add_argument(
        "--k", help=f"concurrent conversations, comma-separated (default {DEFAULT_KS} when no other mode is asked for)"
    )
    parser.add_argument("--tokens", "-T", type=int, default=200, help="tokens per answer (default 200)")
    parser.add_argument("--tps", "-R", type=float, default=30.0, help="model tokens per second (default 30)")
    parser.add_argument(
        "--spread",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="send the K messages evenly over this many seconds instead of all at once, the floor's too (e.g. "
        "T / R = 6.67: K answers streaming at any moment, K / 6.67 new ones a second; default 0)",
    )
    parser.add_argument(
        "--cpus",
        default="0",
        help="CPUs for daphne, workers (and a private Redis), e.g. 0 or "
        "0,1; the model server and the clients get the others when any are left (default 0; "
        "'' = no pinning)",
    )
    parser.add_argument("--workers", type=int, default=1, help="agent worker processes (default 1)")
    parser.add_argument(
        "--webs", type=int, default=1, help="daphne processes, the clients spread over them in turn (default 1)"
    )
    parser.add_argument(
        "--max-runs",
        type=int,
        help="CHORUS_WORKER_MAX_RUNS for every measurement (default: the product's own default; the bench "
        "measures Chorus as shipped unless a flag says otherwise)",
    )
    parser.add_argument(
        "--redis",
        default="private",
        help="'private' (default): a redis-server of its own on a free port, pinned with the servers (the local "
        "Redis when redis-server is not installed); or a Redis URL whose database is flushed, e.g. "
        "redis://127.0.0.1:6379/13 (a shared server is not pinned: its CPU is reported apart)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to this long for other processes to leave the CPUs alone "
        "(under 10%% busy); the load found is reported either way (default 0: do not wait)",
    )
    parser.add_argument("--database-url", help="use this database (migrated, not dropped) instead of a fresh one")
    parser.add_argument(
        "--pg-admin-url",
        default="postgres://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL to create the fresh bench database in (else SQLite under var/)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for the server processes, e.g. CHORUS_TOKEN_COALESCE_MS=5 (repeatable)",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the direct-to-model floor measurement")
    parser.add_argument(
        "--floor-client",
        choices=["openai", "raw", "both"],
        default="both",
        help="how the floor reads the model server: openai = AsyncOpenAI (what a worker's model client itself "
        "costs; it saturates the client CPU from K = 200 on one core), raw = aiohttp and one json.loads per "
        "chunk (what the network and the model server cost), both (default; the table shows both)",
    )
    parser.add_argument("--keep-going", action="store_true", help="measure larger K after a K timed out")
    parser.add_argument("--idle", type=int, metavar="N", help="also hold N authenticated idle sockets on one daphne")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="how long idle sockets are held (10)")
    parser.add_argument(
        "--runs-per-second",
        action="store_true",
        help="also measure runs one worker starts per second with instant model replies",
    )
    parser.add_argument("--rps-runs", type=int, default=200, help="conversations for --runs-per-second (200)")
    parser.add_argument(
        "--profile-k",
        default="",
        help="K values to record with py-spy (e.g. 100); their rows are "
        "marked * (profiling costs the profiled processes a little)",
    )
    parser.add_argument("--profile-rps", action="store_true", help="record the --runs-per-second phase with py-spy too")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (100)")
    parser.add_argument("--connect-concurrency", type=int, default=50, help="handshakes in flight at once (50)")
    parser.add_argument(
        "--live",
        action="store_true",
        help="run the stack from the working tree itself; by default it runs from a copy taken at the start "
        "(var/bench-src/), so edits made meanwhile do not change the code measured halfway",
    )
    parser.add_argument("--out", default="var/bench.json", help="JSON report (default var/bench.json)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown (docs/performance.md's)")
    parser.add_argument("--logs", help="folder for the processes' logs (default var/bench-logs/<time>)")
    args = parser.parse_args(argv)
    if args.k is None and not args.idle and not args.runs_per_second:
        args.k = DEFAULT_KS
    args.ks = [int(k) for k in (args.k or "").split(",") if k.strip() and int(k) > 0]
    args.profile_ks = {int(k) for k in args.profile_k.split(",") if k.strip()}
    args.extra_env = dict(item.split("=", 1) for item in args.env)
    if args.tokens < 1 or args.tps < 0 or args.workers < 1 or args.webs < 1 or args.spread < 0:
        parser.error("--tokens, --workers and --webs must be at least 1, --tps and --spread not negative")
    return args


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=procs.ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.server_cpus = procs.parse_cpus(args.cpus)
        available = os.sched_getaffinity(0)
        rest = available - self.server_cpus if self.server_cpus else set()
        self.client_cpus = rest or None
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.log_dir = Path(args.logs or procs.ROOT / "var" / "bench-logs" / stamp).resolve()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        if not self.out.is_absolute():
            self.out = procs.ROOT / self.out
        self.snapshot_dir: Path | None = None
        self.snapshot_files = 0
        if not args.live:
            self.snapshot_dir = procs.ROOT / "var" / "bench-src" / stamp
            self.snapshot_files = len(procs.snapshot_sources(self.snapshot_dir))
            procs.APP["root"] = self.snapshot_dir
            sys.path.insert(0, str(self.snapshot_dir))  # this process's Django models and parse_stamp too
        self.redis: procs.RedisTarget | None = None
        self.db: procs.Database | None = None
        self.fakellm: procs.Process | None = None
        self.stack: procs.Stack | None = None
        self.recorders: list = []
        self.env: dict[str, str] = {}
        self.model_url = ""
        self.report: dict[str, Any] = {}
        self.table_rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ set-up

    def pinning_note(self) -> str:
        if not self.server_cpus:
            return "no pinning: servers, model server and clients share every CPU"
        servers = f"daphne and workers{' and Redis' if self.redis and not self.redis.shared else ''}"
        note = f"{servers} on CPU {procs.cpu_list(self.server_cpus)}"
        if self.client_cpus:
            note += f"; model server and clients on CPU {procs.cpu_list(self.client_cpus)}"
        else:
            note += "; no CPU left for the model server and clients: they share the servers' CPUs"
        if self.redis and self.redis.shared:
            note += "; the shared Redis server is not pinned (its CPU is reported apart)"
        return note

    def start_common(self) -> None:
        args = self.args
        nofile = procs.raise_open_files_limit()
        if self.client_cpus:
            os.sched_setaffinity(0, self.client_cpus)
        self.redis = procs.RedisTarget(args.redis, self.log_dir, self.server_cpus)
        self.redis.flush()
        self.db = procs.Database.create(args.database_url, args.pg_admin_url, procs.ROOT / "var")
        port = procs.free_port()
        fakellm_args = procs.python_args("-m", "fakellm", "--host", "127.0.0.1", "--port", str(port))
        fakellm_args += ["--tps", str(args.tps)]
        self.fakellm = procs.Process("fakellm", fakellm_args, dict(os.environ), self.log_dir, self.client_cpus)
        procs.wait_for_port(port, 30, self.fakellm)
        self.model_url = f"http://127.0.0.1:{port}/v1"
        self.env = procs.stack_env(
            database_url=self.db.url,
            redis_url=self.redis.url,
            model_url=self.model_url,
            secret_key=secrets.token_urlsafe(50),
            extra=args.extra_env,
        )
        started = time.monotonic()
        procs.run_checked(procs.python_args("manage.py", "migrate", "--noinput"), self.env, 300, "migrate")
        from bench import setup

        setup.django_setup(self.env)
        self.report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted_files": [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()],
            "machine": machine(),
            "command": "python -m bench " + " ".join(sys.argv[1:]),
            "floor_client": args.floor_client,
            "tokens": args.tokens,
            "tps": args.tps,
            "spread_s": args.spread,
            "workers": args.workers,
            "webs": args.webs,
            "pinning": self.pinning_note(),
            "server_cpus": sorted(self.server_cpus or []),
            "client_cpus": sorted(self.client_cpus or []),
            "database": self.db.notes,
            "redis": {"url": self.redis.url, "shared": self.redis.shared},
            "extra_env": args.extra_env,
            "open_files_limit": nofile,
            "logs": str(self.log_dir),
            "source": f"copy of the working tree taken at the start ({self.snapshot_files} files)"
            if self.snapshot_dir
            else "the live working tree",
            "setup_s": round(time.monotonic() - started, 1),
            "streaming": [],
        }
        print(f"bench: {self.report['pinning']}; database {self.db.notes[0]}; Redis {self.redis.url}", flush=True)
        self.report["settings_changed"] = changed = self.settings_changed()
        print(f"bench: settings changed from the product's defaults: {changed or 'none'}", flush=True)
        print(f"bench: logs in {self.log_dir}", flush=True)

    def settings_changed(self) -> dict[str, str]:
        """Every Chorus setting the servers get that differs from a fresh deployment's: --env, --max-runs and
        any CHORUS_* variable inherited from the bench's own environment. The stack's wiring (database, Redis,
        the model server's URL, a secret key, DEBUG=0, no embedded worker) is how any deployment is set up,
        not a change."""
        changed = {name: value for name, value in self.env.items() if name.startswith("CHORUS_")}
        changed.pop("CHORUS_EMBEDDED_WORKER", None)
        changed.update(self.args.extra_env)
        if self.args.max_runs:
            changed["CHORUS_WORKER_MAX_RUNS"] = str(self.args.max_runs)
        return dict(sorted(changed.items()))

    def stop_all(self) -> None:
        for recorder in self.recorders:
            recorder.process.stop()
        if self.stack:
            self.stack.stop()
        if self.fakellm:
            self.fakellm.stop()
        if self.db:
            self.db.drop()
        if self.redis:
            self.redis.close()
        if self.snapshot_dir:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=2, default=str) + "\n")

    # ----------------------------------------------------------------------------------------- helpers

    def new_targets(self, count: int, prefix: str) -> list[tuple[str, str]]:
        """`count` fresh users, each with a logged-in session and a new conversation; (conversation id, cookie)."""
        from bench import setup

        logins = setup.create_logins(count, f"{prefix}-{secrets.token_hex(3)}-")
        conversations = setup.create_conversations(logins)
        setup.close_connections()
        return [(cid, login.cookie) for cid, login in zip(conversations, logins, strict=True)]

    def abandon_leftover_runs(self) -> int:
        """Runs a stopped stack left queued or running (a timed-out K) would be recovered by the next stack's
        worker and burn its CPU: close them in the bench database first."""
        from agents_app.models import Run
        from bench import setup

        count = Run.objects.filter(status__in=["queued", "running"]).update(status="cancelled")
        setup.close_connections()
        return count

    def start_stack(self, name: str, workers: int, max_runs: int | None) -> procs.Stack:
        abandoned = self.abandon_leftover_runs()
        if abandoned:
            print(f"  closed {abandoned} runs the previous stack left unfinished", flush=True)
        env = dict(self.env)
        if max_runs:
            env["CHORUS_WORKER_MAX_RUNS"] = str(max_runs)
        self.redis.flush()
        webs = 1 if name == "idle" else self.args.webs  # idle capacity is one daphne's
        self.stack = procs.Stack(env, self.log_dir / name, self.server_cpus, workers, webs)
        self.stack.start(with_workers=workers > 0)
        return self.stack

    def stop_stack(self) -> None:
        if self.stack:
            self.stack.stop()
            self.stack = None

    def warm_up(self, stack: procs.Stack, count: int) -> dict[str, Any]:
        """One short run per worker: imports, first model client and first database queries are not measured."""
        targets = [(stack.ws_url(cid), cookie) for cid, cookie in self.new_targets(count, "warm")]
        phase = asyncio.run(
            clients.stream_phase(
                targets, stack.origin, WARMUP_CONTENT, run_timeout=120, connect_timeout=30, connect_concurrency=10
            )
        )
        statuses = [r.status or r.error or ("timed out" if r.timed_out else "?") for r in phase["results"]]
        time.sleep(1.0)
        return {"statuses": statuses, "ok": all(s == "succeeded" for s in statuses)}

    def snapshot(self, stack: procs.Stack) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "servers": stack.cpu(),
            "redis": self.redis.cpu_seconds(),
            "fakellm": self.fakellm.cpu_seconds(),
            "bench": procs.proc_cpu_seconds(os.getpid()) or 0.0,
            "server_cores_busy": procs.cpu_busy_ticks(self.server_cpus) / procs.CLK_TCK,
            "loadavg": procs.loadavg(),
        }

    def quiet_check(self) -> float:
        """Busy % of the machine while the bench is idle; waits (--wait-quiet) for other work to end."""
        deadline = time.monotonic() + self.args.wait_quiet
        busy = procs.machine_busy_pct(1.0)
        while busy > 10 and time.monotonic() < deadline:
            print(f"  the machine is {busy}% busy with other work; waiting...", flush=True)
            time.sleep(5)
            busy = procs.machine_busy_pct(1.0)
        if busy > 10:
            print(f"  WARNING: other processes keep the machine {busy}% busy: timings will suffer", flush=True)
        return busy

    def process_health(self, stack: procs.Stack) -> dict[str, Any]:
        time.sleep(1.0)  # let the servers log what the last disconnects did
        health: dict[str, Any] = {"exited": stack.dead(), "log_problems": {}}
        for process in stack.processes:
            count, excerpt = process.log_problems()
            if count:
                health["log_problems"][process.name] = {"lines": count, "excerpt": excerpt}
        return health

    # -------------------------------------------------------------------------------------- streaming

    def floor(self, k: int, content: str, run_timeout: float, kind: str) -> dict[str, Any]:
        busy = procs.cpu_busy_ticks(None) / procs.CLK_TCK
        before = (self.fakellm.cpu_seconds(), procs.proc_cpu_seconds(os.getpid()) or 0.0, time.monotonic())
        phase = measure(clients.floor_phase(self.model_url, k, content, run_timeout, kind, self.args.spread))
        wall = time.monotonic() - before[2]
        busy = procs.cpu_busy_ticks(None) / procs.CLK_TCK - busy
        report = token_report(phase["results"], self.args.tokens)
        report["client_loop_lag_ms"] = distribution(phase["client_loop_lag_ms"])
        report["fakellm_cpu_s"] = round(self.fakellm.cpu_seconds() - before[0], 2)
        report["bench_cpu_s"] = round((procs.proc_cpu_seconds(os.getpid()) or 0.0) - before[1], 2)
        report["wall_s"] = round(wall, 2)
        own = report["fakellm_cpu_s"] + report["bench_cpu_s"]
        report["other_load_pct"] = round(100 * (busy - own) / wall / (os.cpu_count() or 1), 1)
        return report

    def measure_k(self, k: int) -> dict[str, Any]:
        args = self.args
        content = f"[[stamp]] [[tokens:{args.tokens}]] [[tps:{args.tps:g}]]"
        run_timeout = (args.tokens / args.tps if args.tps else 0) + 60
        result: dict[str, Any] = {"k": k, "run_timeout_s": run_timeout, "profiled": k in args.profile_ks}
        result["machine_busy_before_pct"] = self.quiet_check()
        if not args.no_floor:
            for kind in ("openai", "raw"):
                if args.floor_client in (kind, "both"):
                    print(f"  K={k}: floor, {kind} clients straight to the model server...", flush=True)
                    result["floor" if kind == "openai" else "floor_raw"] = self.floor(k, content, run_timeout, kind)
        max_runs = args.max_runs
        result["max_runs_per_worker"] = max_runs or "app default"
        targets_ids = self.new_targets(k, f"k{k}")
        print(f"  K={k}: starting {args.webs} daphne(s) and {args.workers} worker(s)...", flush=True)
        stack = self.start_stack(f"k{k}", args.workers, max_runs)
        result["warmup"] = self.warm_up(stack, args.workers)
        targets = [(stack.ws_url(cid), cookie) for cid, cookie in targets_ids]
        result["machine_busy_after_warmup_pct"] = self.quiet_check()
        marks: dict[str, Any] = {}

        def on_connected() -> None:
            if k in args.profile_ks:
                self.start_profilers(stack, k)
            marks["before"] = self.snapshot(stack)

        def on_finished() -> None:
            marks["after"] = self.snapshot(stack)

        sending = f", sending over {args.spread:g} s" if args.spread else ""
        print(f"  K={k}: {k} clients streaming {args.tokens} tokens at {args.tps:g}/s{sending}...", flush=True)
        phase = measure(
            clients.stream_phase(
                targets,
                stack.origin,
                content,
                run_timeout=run_timeout,
                connect_timeout=30,
                connect_concurrency=args.connect_concurrency,
                on_connected=on_connected,
                on_finished=on_finished,
                spread=args.spread,
            )
        )
        if self.recorders:
            result["profile"] = self.stop_profilers()
        report = token_report(phase["results"], args.tokens)
        result.update(report)
        result.update(self.extra_checks(phase["results"]))
        result["connect_s"] = round(phase["connect_s"], 2)
        result["wall_s"] = round((phase["end_ns"] - phase["go_ns"]) / 1e9, 2)
        result["client_loop_lag_ms"] = distribution(phase["client_loop_lag_ms"])
        # Where the time to first token goes: send -> echo (the web server stored the message), -> run.started
        # (a worker claimed and started it), -> first token (the team set up, the model asked and answering).
        echoed = [(r.echo_ns - r.send_ns) / 1e6 for r in phase["results"] if r.echo_ns and r.send_ns]
        result["message_echo_ms"] = distribution(echoed)
        started = [(r.started_ns - r.send_ns) / 1e6 for r in phase["results"] if r.started_ns and r.send_ns]
        result["run_started_ms"] = distribution(started)
        result["slowest_first_tokens"] = slowest_first_tokens(phase["results"], phase["go_ns"])
        result["cpu"] = self.cpu_report(marks, k * args.tokens)
        result["memory_mb"] = {
            p.name: {"peak": round(p.hwm_mb(), 1), "end": round(p.rss_mb(), 1)} for p in stack.processes
        }
        result["health"] = self.process_health(stack)
        self.stop_stack()
        return result

    def extra_checks(self, results: list[clients.ClientResult]) -> dict[str, Any]:
        """Protocol checks beyond the stamps: the deltas concatenate to the stored answer, seq only grows."""
        mismatched = sum(
            1 for r in results if r.finished and r.answer is not None and "".join(d for _, d in r.tokens) != r.answer
        )
        error_frames = [f for r in results for f in r.error_frames]
        run_errors = [r.run_error for r in results if r.finished and r.status != "succeeded"]
        return {
            "answer_mismatch": mismatched,
            "missing_answer_message": sum(1 for r in results if r.finished and r.answer is None),
            "seq_regressions": sum(r.seq_regressions for r in results),
            "streams_per_answer_max": max((len(r.stream_ids) for r in results), default=0),
            "error_frames": len(error_frames),
            "error_frame_examples": error_frames[:5],
            "run_error_examples": run_errors[:5],
        }

    def cpu_report(self, marks: dict[str, Any], tokens: int) -> dict[str, Any]:
        if "before" not in marks or "after" not in marks:
            return {}
        before, after = marks["before"], marks["after"]
        wall = after["t"] - before["t"]
        per_process = {name: after["servers"].get(name, 0) - before["servers"][name] for name in before["servers"]}
        daphne = sum(v for name, v in per_process.items() if name.startswith("daphne"))
        workers = sum(v for name, v in per_process.items() if name.startswith("worker"))
        servers = daphne + workers
        redis_s = after["redis"] - before["redis"]
        busy = after["server_cores_busy"] - before["server_cores_busy"]
        own_on_server_cores = servers + (0 if self.redis.shared else redis_s)
        n_server = len(self.server_cpus) if self.server_cpus else os.cpu_count()
        n_client = len(self.client_cpus) if self.client_cpus else os.cpu_count()
        fakellm_s = after["fakellm"] - before["fakellm"]
        client_side = fakellm_s + (after["bench"] - before["bench"])
        # The model server does the same work per token in every run: the servers' CPU relative to its CPU
        # cancels most of a shared machine's drift when two commits are compared (docs/performance.md).
        relative = {"daphne": daphne / fakellm_s, "worker": workers / fakellm_s} if fakellm_s > 0 else None
        return {
            "wall_s": round(wall, 2),
            "seconds": {name: round(v, 2) for name, v in per_process.items()},
            "daphne_ms_per_token": daphne * 1000 / tokens,
            "worker_ms_per_token": workers * 1000 / tokens,
            "server_ms_per_token": servers * 1000 / tokens,
            "redis_ms_per_token": redis_s * 1000 / tokens,
            "redis_shared": self.redis.shared,
            "server_cores_busy_pct": round(100 * busy / wall / n_server, 1) if wall else None,
            "other_load_on_server_cores_pct": round(100 * (busy - own_on_server_cores) / wall / n_server, 1)
            if wall and self.server_cpus
            else None,
            "fakellm_cpu_s": round(fakellm_s, 2),
            "relative_to_model_server": {k: round(v, 2) for k, v in relative.items()} if relative else None,
            "bench_cpu_s": round(after["bench"] - before["bench"], 2),
            "client_cores_busy_pct": round(100 * client_side / wall / n_client, 1) if wall else None,
            "loadavg_before": before["loadavg"],
            "loadavg_after": after["loadavg"],
        }

    def start_profilers(self, stack: procs.Stack, k: int | str) -> None:
        from bench.profile import Recorder, py_spy

        exe = py_spy()
        if exe is None:
            print("  py-spy not found (pip install py-spy): not profiling", flush=True)
            return
        for process in stack.processes:
            label = k if isinstance(k, str) else f"k{k}"
            output = self.log_dir / f"profile-{label}-{process.name}.txt"
            self.recorders.append(
                Recorder(exe, process, output, self.args.profile_rate, self.log_dir, self.client_cpus)
            )

    def stop_profilers(self) -> dict[str, Any]:
        summaries = {}
        for recorder in self.recorders:
            summaries[recorder.target.name] = recorder.stop()
        self.recorders = []
        return summaries

    def run_streaming(self) -> None:
        for k in self.args.ks:
            print(f"bench: K={k}", flush=True)
            result = self.measure_k(k)
            self.report["streaming"].append(result)
            self.save()
            print(format_row_line(result), flush=True)
            if result["runs_timed_out"] and not self.args.keep_going:
                print(f"bench: runs timed out at K={k}; not measuring larger K (--keep-going to do so)", flush=True)
                break

    # ------------------------------------------------------------------------------------------- idle

    def run_idle(self, n: int) -> None:
        print(f"bench: {n} idle sockets on one daphne...", flush=True)
        ids = self.new_targets(n + 1, "idle")
        busy = self.quiet_check()
        stack = self.start_stack("idle", 0, None)
        daphne = stack.daphne
        warm = [(stack.ws_url(cid), cookie) for cid, cookie in ids[:1]]
        asyncio.run(
            clients.idle_phase(
                warm, stack.origin, hold_s=0, connect_timeout=30, connect_concurrency=1, probe=lambda _label: None
            )
        )
        time.sleep(1.0)
        probes: dict[str, dict[str, float]] = {}

        def probe(label: str) -> None:
            probes[label] = {
                "t": time.monotonic(),
                "rss_mb": daphne.rss_mb(),
                "cpu_s": daphne.cpu_seconds(),
                "open_files": procs.proc_open_files(daphne.pid),
            }

        targets = [(stack.ws_url(cid), cookie) for cid, cookie in ids[1:]]
        phase = asyncio.run(
            clients.idle_phase(
                targets,
                stack.origin,
                hold_s=self.args.idle_seconds,
                connect_timeout=30,
                connect_concurrency=self.args.connect_concurrency,
                probe=probe,
            )
        )
        opened = phase["opened"] or 1
        rss_open = probes["opened"]["rss_mb"] - probes["before"]["rss_mb"]
        rss_answered = probes["answered"]["rss_mb"] - probes["before"]["rss_mb"]
        hold_wall = probes["held"]["t"] - probes["opened"]["t"]
        self.report["idle"] = {
            **phase,
            "hold_s": self.args.idle_seconds,
            "machine_busy_before_pct": busy,
            "daphne_rss_mb": {label: round(p["rss_mb"], 1) for label, p in probes.items()},
            "daphne_open_files": {label: p["open_files"] for label, p in probes.items()},
            "kb_per_socket_open": round(rss_open * 1024 / opened, 1),
            "kb_per_socket_after_use": round(rss_answered * 1024 / opened, 1),
            "daphne_cpu_pct_while_idle": round(
                100 * (probes["held"]["cpu_s"] - probes["opened"]["cpu_s"]) / hold_wall, 1
            ),
            "daphne_peak_mb": round(daphne.hwm_mb(), 1),
            "health": self.process_health(stack),
        }
        self.stop_stack()
        self.save()
        print(format_idle(self.report["idle"]), flush=True)

    # --------------------------------------------------------------------------------- runs per second

    def run_rps(self, m: int) -> None:
        print(f"bench: runs per second, {m} conversations, instant replies...", flush=True)
        ids = self.new_targets(m, "rps")
        stack = self.start_stack("rps", self.args.workers, self.args.max_runs)
        warmup = self.warm_up(stack, self.args.workers)
        busy = self.quiet_check()
        targets = [(stack.ws_url(cid), cookie) for cid, cookie in ids]
        marks: dict[str, Any] = {}

        def on_connected() -> None:
            if self.args.profile_rps:
                self.start_profilers(stack, "rps")
            marks.setdefault("before", self.snapshot(stack))

        phase = measure(
            clients.stream_phase(
                targets,
                stack.origin,
                RPS_CONTENT,
                run_timeout=60 + m * 0.5,
                connect_timeout=30,
                connect_concurrency=self.args.connect_concurrency,
                on_connected=on_connected,
                on_finished=lambda: marks.setdefault("after", self.snapshot(stack)),
            )
        )
        profile = self.stop_profilers() if self.recorders else None
        results = phase["results"]
        sends = [r.send_ns for r in results if r.send_ns]
        started = sorted(r.started_ns for r in results if r.started_ns)
        finished = sorted(r.finished_ns for r in results if r.finished_ns)
        first = min(sends) if sends else 0

        def rate(times: list[int]) -> float | None:
            return round(len(times) / ((times[-1] - first) / 1e9), 1) if times and times[-1] > first else None

        def steady(times: list[int]) -> float | None:
            if len(times) < 10:
                return None
            low, high = times[len(times) // 10], times[len(times) * 9 // 10]
            return round((len(times) * 9 // 10 - len(times) // 10) / ((high - low) / 1e9), 1) if high > low else None

        cpu = self.cpu_report(marks, max(1, len(finished)))
        self.report["runs_per_second"] = {
            "runs": m,
            "workers": self.args.workers,
            "max_runs_per_worker": self.args.max_runs or "app default",
            "warmup": warmup,
            "machine_busy_before_pct": busy,
            "started": len(started),
            "succeeded": sum(1 for r in results if r.status == "succeeded"),
            "failed": sum(1 for r in results if (r.finished and r.status != "succeeded") or r.error),
            "timed_out": sum(1 for r in results if r.timed_out),
            "started_per_s": rate(started),
            "finished_per_s": rate(finished),
            "started_per_s_steady": steady(started),
            "send_to_started_ms": distribution([(r.started_ns - r.send_ns) / 1e6 for r in results if r.started_ns]),
            "send_to_finished_ms": distribution([(r.finished_ns - r.send_ns) / 1e6 for r in results if r.finished_ns]),
            "cpu_ms_per_run": {
                "daphne": round(cpu.get("daphne_ms_per_token", 0), 2),
                "worker": round(cpu.get("worker_ms_per_token", 0), 2),
            },
            "cpu": cpu,
            "memory_mb": {p.name: round(p.hwm_mb(), 1) for p in stack.processes},
            "extra": self.extra_checks(results),
            "health": self.process_health(stack),
            "profile": profile,
        }
        self.stop_stack()
        self.save()
        print(format_rps(self.report["runs_per_second"]), flush=True)

    # --------------------------------------------------------------------------------------------- main

    def run(self) -> None:
        started = time.monotonic()
        self.start_common()
        if self.args.ks:
            self.run_streaming()
        if self.args.idle:
            self.run_idle(self.args.idle)
        if self.args.runs_per_second:
            self.run_rps(self.args.rps_runs)
        self.report["total_s"] = round(time.monotonic() - started, 1)
        self.save()
        if self.args.markdown:
            Path(self.args.markdown).write_text(markdown_report(self.report))
        print()
        print(format_report(self.report))
        print(f"\nJSON: {self.out}   logs: {self.log_dir}   total {self.report['total_s']} s")


# ------------------------------------------------------------------------------------------------- output

HEADER = (
    f"{'K':>4} {'tokens ok/lost/dup/ooo':>24} {'fail/tmo':>8} {'latency p50/p99/max ms':>23} "
    f"{'TTFT p50/p99':>13} {'floor p99 sdk/raw':>17} {'floor TTFT50':>12} {'CPU ms/tok d/w/tot':>19} "
    f"{'peak RSS MB d/w':>16} {'other%':>6}"
)


def format_row(r: dict[str, Any]) -> str:
    lat, ttft = r["latency_ms"], r["ttft_ms"]
    cpu = r.get("cpu") or {}
    mem = r.get("memory_mb") or {}
    workers_mb = sum(v["peak"] for name, v in mem.items() if name.startswith("worker"))
    tokens = f"{r['tokens_ok']}/{r['tokens_lost']}/{r['tokens_duplicated']}/{r['tokens_out_of_order']}"
    floors = [r.get("floor") or {}, r.get("floor_raw") or {}]
    floor_p99 = "/".join(fmt((f.get("latency_ms") or {}).get("p99"), 1) for f in floors)
    floor_ttft = "/".join(fmt((f.get("ttft_ms") or {}).get("p50")) for f in floors)
    cpu_text = "/".join(
        fmt(cpu.get(key), 2) for key in ("daphne_ms_per_token", "worker_ms_per_token", "server_ms_per_token")
    )
    return (
        f"{str(r['k']) + ('*' if r.get('profiled') else ''):>4} {tokens:>24} "
        f"{str(r['runs_failed']) + '/' + str(r['runs_timed_out']):>8} "
        f"{fmt(lat['p50']) + '/' + fmt(lat['p99']) + '/' + fmt(lat['max']):>23} "
        f"{fmt(ttft['p50']) + '/' + fmt(ttft['p99']):>13} {floor_p99:>17} {floor_ttft:>12} {cpu_text:>19} "
        f"{fmt(daphne_peak(mem)) + '/' + fmt(workers_mb):>16} "
        f"{fmt(cpu.get('other_load_on_server_cores_pct')):>6}"
    )


def format_row_line(r: dict[str, Any]) -> str:
    cpu = r.get("cpu") or {}
    notes = [
        f"wall {r['wall_s']} s",
        f"server cores busy {cpu.get('server_cores_busy_pct')}%",
        f"other load there {cpu.get('other_load_on_server_cores_pct')}%",
        f"client cores busy {cpu.get('client_cores_busy_pct')}%",
        f"client loop lag p99 {fmt(r['client_loop_lag_ms']['p99'])} ms max {fmt(r['client_loop_lag_ms']['max'])} ms",
        *(
            f"floor {name}: other load {r[key]['other_load_pct']}%, client loop lag p99 "
            f"{fmt(r[key]['client_loop_lag_ms']['p99'])} ms"
            for name, key in (("sdk", "floor"), ("raw", "floor_raw"))
            if r.get(key)
        ),
        f"Redis {fmt(cpu.get('redis_ms_per_token'), 3)} ms/token",
        "CPU relative to the model server's: "
        + " / ".join(f"{k} {v}" for k, v in (cpu.get("relative_to_model_server") or {}).items()),
    ]
    health = r.get("health") or {}
    if health.get("exited"):
        notes.append("EXITED: " + "; ".join(health["exited"]))
    for name, problem in (health.get("log_problems") or {}).items():
        notes.append(f"{name} log: {problem['lines']} suspicious lines")
    if r.get("error_frames") or r.get("answer_mismatch") or r.get("seq_regressions") or r.get("connect_failed"):
        notes.append(
            f"error frames {r['error_frames']}, answer mismatches {r['answer_mismatch']}, "
            f"seq regressions {r['seq_regressions']}, connect failures {r['connect_failed']}"
        )
    if (r["client_loop_lag_ms"].get("max") or 0) > BENCH_STALL_MS:
        # Tokens that arrived while the clients' own loop was stalled are counted late: the latency max and p99
        # may be the bench's, not the servers'.
        notes.append(f"BENCH STALLED {fmt(r['client_loop_lag_ms']['max'])} ms: latency may be overstated")
    if not (r.get("warmup") or {}).get("ok", True):
        notes.append(f"warm-up: {r['warmup']['statuses']}")
    return HEADER + "\n" + format_row(r) + "\n      " + "; ".join(notes)


def format_idle(idle: dict[str, Any]) -> str:
    return (
        f"idle: {idle['opened']}/{idle['requested']} sockets opened in {idle['open_s']:.1f} s, "
        f"{idle['still_open_after_hold']} still open after {idle['hold_s']:g} s, "
        f"{idle['answered_after_hold']} answered; daphne +{idle['kb_per_socket_open']} KB per socket "
        f"(+{idle['kb_per_socket_after_use']} KB after each answered one frame), "
        f"RSS {idle['daphne_rss_mb']}, CPU while idle {idle['daphne_cpu_pct_while_idle']}%"
        + (
            f", connect errors {idle['connect_errors']}: {idle['connect_error_examples']}"
            if idle["connect_errors"]
            else ""
        )
    )


def format_rps(rps: dict[str, Any]) -> str:
    started = rps["send_to_started_ms"]
    return (
        f"runs per second ({rps['runs']} runs at once, {rps['workers']} worker(s), max runs "
        f"{rps['max_runs_per_worker']}): started {rps['started_per_s']}/s (steady {rps['started_per_s_steady']}/s), "
        f"finished {rps['finished_per_s']}/s; send->run.started p50 {fmt(started['p50'])} ms p99 "
        f"{fmt(started['p99'])} ms; succeeded {rps['succeeded']}, failed {rps['failed']}, timed out "
        f"{rps['timed_out']}; CPU ms per run daphne {rps['cpu_ms_per_run']['daphne']} worker "
        f"{rps['cpu_ms_per_run']['worker']}"
    )


def slowest_first_tokens(results: list, go_ns: int, count: int = 8) -> list[dict[str, float | None]]:
    """The clients whose first token came last after their send, each with when it sent (ms after the start)
    and its echo, run.started and first token (ms after its send). If the slowest sent at about the same
    moment, a stall delayed them; if their sends are spread over the phase, they waited in a queue."""

    def after_send(ns: int | None, result) -> float | None:
        return round((ns - result.send_ns) / 1e6, 1) if ns and result.send_ns else None

    timed = [r for r in results if r.send_ns and r.tokens]
    timed.sort(key=lambda r: r.tokens[0][0] - r.send_ns, reverse=True)
    return [
        {
            "sent_ms": round((r.send_ns - go_ns) / 1e6, 1),
            "echo_ms": after_send(r.echo_ns, r),
            "run_started_ms": after_send(r.started_ns, r),
            "first_token_ms": after_send(r.tokens[0][0], r),
        }
        for r in timed[:count]
    ]


def format_report(report: dict[str, Any]) -> str:
    out = [
        f"Chorus bench {report['date']}  commit {report['commit']}"
        + (f" (+{len(report['uncommitted_files'])} uncommitted files)" if report["uncommitted_files"] else "")
        + f"  {report['machine']['cpus']} CPUs  T={report['tokens']} R={report['tps']:g} workers={report['workers']}"
        + (f"  sends spread over {report['spread_s']:g} s" if report.get("spread_s") else "  all sending at once"),
        f"pinning: {report['pinning']}",
    ]
    if report["streaming"]:
        out += ["", HEADER] + [format_row(r) for r in report["streaming"]]
        out.append(
            "tokens: ok = distinct stamped tokens received; lost counted on finished runs; fail/tmo = runs failed / "
            "timed out; latency = arrival - model stamp; TTFT from send; floor sdk/raw = the same clients reading the "
            "model server with AsyncOpenAI / with aiohttp; CPU = (utime+stime) / (K*T); other% = CPU "
            "other processes took on the server cores during the measurement"
        )
        for r in report["streaming"]:
            for name, summary in (r.get("profile") or {}).items():
                from bench.profile import format_summary

                out += ["", f"profile K={r['k']} " + format_summary(name, summary)]
    if report.get("idle"):
        out += ["", format_idle(report["idle"])]
    if report.get("runs_per_second"):
        out += ["", format_rps(report["runs_per_second"])]
        for name, summary in (report["runs_per_second"].get("profile") or {}).items():
            from bench.profile import format_summary

            out += ["", "profile runs per second " + format_summary(name, summary)]
    return "\n".join(out)


def markdown_report(report: dict[str, Any]) -> str:
    """The run's tables as Markdown, as docs/performance.md keeps them."""
    out = [
        f"`{report['command']}` on commit `{report['commit']}`, {report['date']}: {report['machine']['cpus']} CPUs "
        f"({report['machine']['cpu_model'] or 'unknown model'}), Python {report['machine']['python']}; "
        f"T={report['tokens']} tokens per answer at R={report['tps']:g} tokens/s, "
        + (f"the K messages sent evenly over {report['spread_s']:g} s, " if report.get("spread_s") else "")
        + f"{report.get('webs', 1)} daphne(s), {report['workers']} worker(s); "
        f"{report['pinning']}.",
        "",
    ]
    if report["streaming"]:
        out += [
            "| K | tokens ok / lost / dup / out of order | runs failed / timed out | delivery latency p50 / p99 / max "
            "(ms) | TTFT p50 / p99 (ms) | floor TTFT p50 (ms) | floor latency p99 (ms) | server CPU per token "
            "daphne / worker / total (ms) | Redis CPU per token (ms) | peak RSS daphne / workers (MB) |",
            "| ---: | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in report["streaming"]:
            lat, ttft, cpu, mem = r["latency_ms"], r["ttft_ms"], r.get("cpu") or {}, r.get("memory_mb") or {}
            floor = r.get("floor_raw") or r.get("floor") or {}
            floor_ttft, floor_p99 = (floor.get("ttft_ms") or {}).get("p50"), (floor.get("latency_ms") or {}).get("p99")
            workers_mb = sum(v["peak"] for name, v in mem.items() if name.startswith("worker"))
            out.append(
                f"| {r['k']} | {r['tokens_ok']} / {r['tokens_lost']} / {r['tokens_duplicated']} / "
                f"{r['tokens_out_of_order']} | {r['runs_failed']} / {r['runs_timed_out']} | "
                f"{fmt(lat['p50'])} / {fmt(lat['p99'])} / {fmt(lat['max'])} | {fmt(ttft['p50'])} / {fmt(ttft['p99'])} "
                f"| {fmt(floor_ttft)} | {fmt(floor_p99, 1)} "
                f"| {fmt(cpu.get('daphne_ms_per_token'), 2)} / {fmt(cpu.get('worker_ms_per_token'), 2)} / "
                f"{fmt(cpu.get('server_ms_per_token'), 2)} | {fmt(cpu.get('redis_ms_per_token'), 3)} | "
                f"{fmt(daphne_peak(mem))} / {fmt(workers_mb)} |"
            )
    if report.get("idle"):
        out += ["", format_idle(report["idle"]) + "."]
    if report.get("runs_per_second"):
        out += ["", format_rps(report["runs_per_second"]) + "."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Bench(args)

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    try:
        bench.run()
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping every process it started", file=sys.stderr, flush=True)
        if bench.report:
            bench.report["interrupted"] = True
            bench.save()
        raise SystemExit(130) from None
    finally:
        bench.stop_all()


def daphne_peak(mem: dict[str, Any]) -> float | None:
    """The largest peak RSS of the daphnes (one each when there are several)."""
    return max((v["peak"] for name, v in mem.items() if name.startswith("daphne")), default=None)
