"""Percentiles and the per-K summary of what the clients saw."""

from __future__ import annotations

import math
from typing import Any


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list (p in 0..100); None for an empty list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def distribution(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else None,
        "mean": sum(ordered) / len(ordered) if ordered else None,
    }


def token_report(results: list[Any], expected_tokens: int) -> dict[str, Any]:
    """Delivery quality and timing from stamped token deltas.

    Each result has `send_ns`, `tokens` (a list of (arrival_ns, delta)), `finished` (bool: the client saw the
    end of its answer), `status`, `error` and `timed_out`. A token's delivery latency is its arrival time minus
    the time the model server stamped when it wrote it; coalesced tokens each count from their own stamp.
    """
    from fakellm import parse_stamp  # imported late: from the snapshot the stack runs (bench.cli)

    latencies_ms: list[float] = []
    ttft_ms: list[float] = []
    received = unique = lost = duplicated = out_of_order = exact = 0
    finished = failed = timed_out = connect_failed = unstamped_frames = 0
    problems: list[str] = []
    for index, result in enumerate(results):
        if result.error and not result.connected:
            connect_failed += 1
            if len(problems) < 10:
                problems.append(f"client {index}: could not connect: {result.error}")
            continue
        seqs: list[int] = []
        first_arrival = None
        for arrival_ns, delta in result.tokens:
            stamps = parse_stamp(delta)
            if not stamps:
                unstamped_frames += 1
                continue
            if first_arrival is None:
                first_arrival = arrival_ns
            for seq, written_ns in stamps:
                seqs.append(seq)
                latencies_ms.append((arrival_ns - written_ns) / 1e6)
        if first_arrival is not None and result.send_ns:
            ttft_ms.append((first_arrival - result.send_ns) / 1e6)
        distinct = set(seqs)
        received += len(seqs)
        duplicated += len(seqs) - len(distinct)
        out_of_order += sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b < a)
        in_range = distinct & set(range(1, expected_tokens + 1))
        unique += len(in_range)
        if result.finished:
            finished += 1
            lost += expected_tokens - len(in_range)
            if seqs == list(range(1, expected_tokens + 1)):
                exact += 1
        if result.timed_out:
            timed_out += 1
        if result.finished and result.status != "succeeded" or result.error:
            failed += 1
            if len(problems) < 10:
                problems.append(f"client {index}: status={result.status} error={result.error}")
    return {
        "clients": len(results),
        "expected_tokens": expected_tokens * len(results),
        "tokens_received": received,
        "tokens_ok": unique,
        "tokens_lost": lost,
        "tokens_duplicated": duplicated,
        "tokens_out_of_order": out_of_order,
        "unstamped_token_frames": unstamped_frames,
        "clients_exact": exact,
        "clients_finished": finished,
        "runs_failed": failed,
        "runs_timed_out": timed_out,
        "connect_failed": connect_failed,
        "latency_ms": distribution(latencies_ms),
        "ttft_ms": distribution(ttft_ms),
        "problems": problems,
    }


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"
