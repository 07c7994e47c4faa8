"""The clients: logged-in WebSocket clients speaking protocol v1, the same clients reading the model server
directly (the floor), and idle sockets. Everything is bounded: every wait has a timeout, every loop a count."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.protocol import State

CLOSE_TIMEOUT = 5.0


@dataclass
class ClientResult:
    connected: bool = False
    error: str | None = None  # connection trouble or an unexpected close (not a timeout)
    send_ns: int = 0
    echo_ns: int | None = None  # the echo of the person's own message arrived (it is stored)
    started_ns: int | None = None  # run.started arrived
    finished_ns: int | None = None  # run.finished arrived
    finished: bool = False
    status: str | None = None
    run_error: Any = None
    timed_out: bool = False
    tokens: list[tuple[int, str]] = field(default_factory=list)  # (arrival time_ns, delta)
    stream_ids: set[str] = field(default_factory=set)
    answer: str | None = None  # content of the final answer's `message` event
    error_frames: list[dict] = field(default_factory=list)
    seq_regressions: int = 0  # events whose seq did not grow
    events: int = 0


class Shared:
    """What every client of one phase shares: the start barrier and the deadline set when it opens."""

    def __init__(self, count: int):
        self.count = count
        self.ready = 0
        self.all_ready = asyncio.Event()
        self.go = asyncio.Event()
        self.deadline = 0.0  # loop time

    def arrived(self) -> None:
        self.ready += 1
        if self.ready >= self.count:
            self.all_ready.set()


class LagMonitor:
    """Measures how late this process's event loop wakes up: a busy client inflates every latency it sees."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.lags_ms: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(10_000_000):
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.lags_ms.append((loop.time() - before - self.interval) * 1000)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def ws_headers(cookie: str, origin: str) -> dict[str, str]:
    return {"Cookie": f"sessionid={cookie}", "Origin": origin}


async def open_socket(url: str, cookie: str, origin: str, wait_s: float):
    """Connect as a logged-in browser and read `hello`; returns (socket, hello)."""
    ws = await websockets.connect(
        url,
        additional_headers=ws_headers(cookie, origin),
        open_timeout=wait_s,
        close_timeout=CLOSE_TIMEOUT,
        ping_interval=None,  # idle sockets stay idle; the server's own pings are answered by the library
        compression=None,
        max_size=2**22,
    )
    try:
        hello = json.loads(await asyncio.wait_for(ws.recv(), wait_s))
    except BaseException:
        await _close(ws)
        raise
    if hello.get("type") != "hello":
        await _close(ws)
        raise RuntimeError(f"expected hello, got {str(hello)[:200]}")
    return ws, hello


async def _close(ws) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT + 1)


async def stream_client(
    url: str,
    cookie: str,
    origin: str,
    content: str,
    shared: Shared,
    gate: asyncio.Semaphore,
    connect_timeout: float,
    delay: float = 0.0,
) -> ClientResult:
    """Connect, wait for everyone (and `delay` seconds more), send one message, and read events until
    run.finished (or the deadline)."""
    result = ClientResult()
    try:
        async with gate:
            ws, hello = await open_socket(url, cookie, origin, connect_timeout)
        result.connected = True
    except Exception as exc:  # noqa: BLE001 - any failure is reported per client
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        shared.arrived()
        return result
    shared.arrived()
    last_seq = hello.get("last_seq") or 0
    try:
        await shared.go.wait()
        if delay:
            await asyncio.sleep(delay)
        result.send_ns = time.time_ns()
        await ws.send(json.dumps({"type": "send", "content": content}))
        async with asyncio.timeout_at(shared.deadline):
            async for raw in ws:
                arrived = time.time_ns()
                event = json.loads(raw)
                result.events += 1
                kind = event.get("type")
                if kind == "error":
                    result.error_frames.append(event)
                    continue
                seq = event.get("seq")
                if isinstance(seq, int):
                    if seq <= last_seq:
                        result.seq_regressions += 1
                    last_seq = max(last_seq, seq)
                if kind == "token":
                    result.tokens.append((arrived, event.get("delta", "")))
                    result.stream_ids.add(event.get("stream_id"))
                elif kind == "run.started":
                    result.started_ns = arrived
                elif kind == "message":
                    message = event.get("message") or {}
                    if message.get("role") == "user" and result.echo_ns is None:
                        result.echo_ns = arrived
                    if message.get("role") == "assistant" and message.get("is_final_answer"):
                        result.answer = message.get("content")
                elif kind == "run.finished":
                    result.finished_ns = arrived
                    result.finished = True
                    result.status = event.get("status")
                    result.run_error = event.get("error")
                    break
            else:
                result.error = "the server closed the socket before run.finished"
    except TimeoutError:
        result.timed_out = True
    except websockets.ConnectionClosed as exc:
        result.error = f"socket closed before run.finished: {exc}"[:300]
    except Exception as exc:  # noqa: BLE001
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        await _close(ws)
    return result


async def stream_phase(
    targets: list[tuple[str, str]],
    origin: str,
    content: str,
    *,
    run_timeout: float,
    connect_timeout: float,
    connect_concurrency: int,
    on_connected=None,
    on_finished=None,
    spread: float = 0.0,
) -> dict[str, Any]:
    """K clients (url, cookie): connect all, then all send at once (`on_connected()` runs just before), or
    evenly over `spread` seconds, and read until every run finished or `run_timeout` seconds passed after its
    send. `on_finished()` runs as the last ends."""
    loop = asyncio.get_running_loop()
    shared = Shared(len(targets))
    gate = asyncio.Semaphore(connect_concurrency)
    connect_started = time.monotonic()
    delays = [send_delay(i, len(targets), spread) for i in range(len(targets))]
    tasks = [
        asyncio.create_task(stream_client(url, cookie, origin, content, shared, gate, connect_timeout, delay))
        for (url, cookie), delay in zip(targets, delays, strict=True)
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(shared.all_ready.wait(), connect_timeout * (1 + len(targets) / connect_concurrency))
    connect_s = time.monotonic() - connect_started
    if on_connected:
        on_connected()
    lag = LagMonitor()
    lag.start()
    shared.deadline = loop.time() + spread + run_timeout
    go_ns = time.time_ns()
    shared.go.set()
    done, pending = await asyncio.wait(tasks, timeout=spread + run_timeout + 2 * CLOSE_TIMEOUT + 10)
    end_ns = time.time_ns()
    if on_finished:
        on_finished()
    await lag.stop()
    for task in pending:
        task.cancel()
    results = []
    for task in tasks:
        if task in done and not task.cancelled() and task.exception() is None:
            results.append(task.result())
        else:
            results.append(ClientResult(connected=True, timed_out=True, error="client task did not end"))
    return {
        "results": results,
        "connect_s": connect_s,
        "go_ns": go_ns,
        "end_ns": end_ns,
        "client_loop_lag_ms": lag.lags_ms,
    }


def send_delay(index: int, count: int, spread: float) -> float:
    """When client `index` of `count` sends, after the start: all at once, or evenly over `spread` seconds (a
    steady rate of count / spread messages a second; the same for the floor's clients)."""
    return index * spread / count if spread > 0 else 0.0


# ------------------------------------------------------------------------------------------------ the floor


async def floor_client(client, content: str, shared: Shared, delay: float = 0.0) -> ClientResult:
    """The same request, straight to the model server with the OpenAI client (what the worker's model client
    reads), without Chorus in between."""
    result = ClientResult(connected=True)
    shared.arrived()
    try:
        await shared.go.wait()
        if delay:
            await asyncio.sleep(delay)
        async with asyncio.timeout_at(shared.deadline):
            result.send_ns = time.time_ns()
            stream = await client.chat.completions.create(
                model="chorus-offline", messages=[{"role": "user", "content": content}], stream=True
            )
            async for chunk in stream:
                arrived = time.time_ns()
                if chunk.choices and chunk.choices[0].delta.content:
                    result.tokens.append((arrived, chunk.choices[0].delta.content))
            result.finished = True
            result.status = "succeeded"
    except TimeoutError:
        result.timed_out = True
    except Exception as exc:  # noqa: BLE001
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


class RawChatClient:
    """The cheapest way to read the stream: aiohttp, one JSON decode per SSE line, no SDK objects. Same
    interface as much of AsyncOpenAI as floor_client uses."""

    def __init__(self, base_url: str, timeout: float):
        import aiohttp

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=timeout)
        )
        self.chat = self
        self.completions = self

    async def create(self, model: str, messages: list[dict], stream: bool = True):
        response = await self.session.post(self.url, json={"model": model, "messages": messages, "stream": stream})
        response.raise_for_status()
        return self._chunks(response)

    async def _chunks(self, response):
        from types import SimpleNamespace

        async with response:
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                data = json.loads(line[6:])
                choices = [
                    SimpleNamespace(delta=SimpleNamespace(content=c.get("delta", {}).get("content")))
                    for c in data.get("choices") or []
                ]
                yield SimpleNamespace(choices=choices)

    async def close(self) -> None:
        await self.session.close()


async def floor_phase(
    model_url: str, count: int, content: str, run_timeout: float, kind: str = "openai", spread: float = 0.0
) -> dict[str, Any]:
    if kind == "raw":
        client = RawChatClient(model_url, run_timeout)
    else:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=model_url, api_key="bench", max_retries=0, timeout=run_timeout)
    try:
        # Warm the client (imports, first connection) so the floor is not the client's own start-up.
        warm = await client.chat.completions.create(
            model="chorus-offline", messages=[{"role": "user", "content": "[[tokens:2]] [[tps:0]]"}], stream=True
        )
        async for _ in warm:
            pass
        loop = asyncio.get_running_loop()
        shared = Shared(count)
        tasks = [
            asyncio.create_task(floor_client(client, content, shared, send_delay(i, count, spread)))
            for i in range(count)
        ]
        await asyncio.sleep(0)
        lag = LagMonitor()
        lag.start()
        shared.deadline = loop.time() + spread + run_timeout
        shared.go.set()
        done, pending = await asyncio.wait(tasks, timeout=spread + run_timeout + 10)
        await lag.stop()
        for task in pending:
            task.cancel()
        results = [
            t.result() if t in done and t.exception() is None else ClientResult(connected=True, timed_out=True)
            for t in tasks
        ]
        return {"results": results, "client_loop_lag_ms": lag.lags_ms}
    finally:
        await client.close()


# ------------------------------------------------------------------------------------------------ idle sockets


async def idle_phase(
    targets: list[tuple[str, str]],
    origin: str,
    *,
    hold_s: float,
    connect_timeout: float,
    connect_concurrency: int,
    probe,
) -> dict[str, Any]:
    """Open every socket (logged in, one conversation each), hold them idle for `hold_s`, then check each one
    still answers: a frame of an unknown type must come back as an `error` event. `probe(label)` is called at
    each step (to read the server's memory)."""
    gate = asyncio.Semaphore(connect_concurrency)
    sockets: list[Any] = [None] * len(targets)
    errors: list[str] = []

    async def connect(index: int, url: str, cookie: str) -> None:
        try:
            async with gate:
                sockets[index], _ = await open_socket(url, cookie, origin, connect_timeout)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}"[:200])

    probe("before")
    started = time.monotonic()
    await asyncio.gather(*(connect(i, url, cookie) for i, (url, cookie) in enumerate(targets)))
    open_s = time.monotonic() - started
    opened = sum(ws is not None for ws in sockets)
    probe("opened")
    await asyncio.sleep(hold_s)
    still_open = sum(ws is not None and ws.state is State.OPEN for ws in sockets)
    probe("held")

    async def ping(ws) -> bool:
        try:
            await ws.send(json.dumps({"type": "bench.ping"}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), connect_timeout))
            return reply.get("type") == "error"
        except Exception:  # noqa: BLE001
            return False

    answers = []
    live = [ws for ws in sockets if ws is not None]
    for start in range(0, len(live), connect_concurrency * 4):
        answers += await asyncio.gather(*(ping(ws) for ws in live[start : start + connect_concurrency * 4]))
    probe("answered")
    await asyncio.gather(*(_close(ws) for ws in live))
    return {
        "requested": len(targets),
        "opened": opened,
        "open_s": open_s,
        "still_open_after_hold": still_open,
        "answered_after_hold": sum(answers),
        "connect_errors": len(errors),
        "connect_error_examples": sorted(set(errors))[:5],
    }
