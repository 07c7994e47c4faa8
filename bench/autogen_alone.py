"""AutoGen by itself, without Chorus: the CPU one run of the Assistant team costs in one process against the
offline model server, how much of it comes before AutoGen asks its model client, and before the first token.

    python -m bench.autogen_alone [--runs 300] [--cpus 0]

What it is for: with K messages sent at once to servers on one core, the time to first token is a queue (each
run's work up to its model request, one after another), so the median person waits for about K / 2 runs of
it. Whatever a server built on AutoGen adds, this is AutoGen's own share of that queue: its runtime setting up
the team and routing the task to the agent, then the openai SDK sending the request. Two ways of building the
team are measured: loaded from its JSON for every run, with a new model client each time (as AutoGen Studio
does), and built around one model client shared by every run (as a Chorus worker shares its clients).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procs

TASK = "[[tokens:1]] [[tps:0]] hello"  # the offline model server answers at once, one token
CONFIG = Path(__file__).resolve().parent.parent / "agents_app" / "teams" / "assistant.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.autogen_alone", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="measured runs per way of building the team (300)")
    parser.add_argument("--warmup", type=int, default=30, help="runs before measuring (30)")
    parser.add_argument("--cpus", default="0", help="CPUs for this process; the model server gets the others (0)")
    parser.add_argument("--out", help="also write the numbers as JSON here")
    return parser.parse_args(argv)


def team_config(base_url: str) -> dict[str, Any]:
    config = json.loads(CONFIG.read_text())
    client = config["config"]["participants"][0]["config"]["model_client"]["config"]
    client.update(base_url=base_url, api_key="bench", max_retries=0)
    return config


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "mean": round(statistics.mean(values), 2)}


async def measure(base_url: str, runs: int, warmup: int) -> dict[str, Any]:
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.teams import RoundRobinGroupChat
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    asked: list[float] = []  # process CPU time when AutoGen called its model client's create_stream
    original = OpenAIChatCompletionClient.create_stream

    def timed_create_stream(self, *args, **kwargs):
        asked.append(time.process_time())
        return original(self, *args, **kwargs)

    config = team_config(base_url)
    agent_config = config["config"]["participants"][0]["config"]
    shared_client = OpenAIChatCompletionClient(**agent_config["model_client"]["config"])

    def from_json() -> Any:
        return RoundRobinGroupChat.load_component(config)

    def shared() -> Any:
        agent = AssistantAgent(
            agent_config["name"],
            model_client=shared_client,
            system_message=agent_config["system_message"],
            description=agent_config["description"],
            model_client_stream=True,
        )
        return RoundRobinGroupChat([agent], max_turns=1)

    OpenAIChatCompletionClient.create_stream = timed_create_stream  # type: ignore[method-assign]
    try:
        return {
            "loaded_from_json_per_run": await measure_runs(from_json, runs, warmup, asked),
            "shared_model_client": await measure_runs(shared, runs, warmup, asked),
        }
    finally:
        OpenAIChatCompletionClient.create_stream = original  # type: ignore[method-assign]
        await shared_client.close()


async def measure_runs(build, runs: int, warmup: int, asked: list[float]) -> dict[str, Any]:
    """`warmup + runs` runs of the team `build()` makes; the CPU of the last `runs`, whole and in parts."""
    from autogen_agentchat.messages import ModelClientStreamingChunkEvent

    totals, before_model, first_token = [], [], []
    for index in range(warmup + runs):
        if index == warmup:
            gc.collect()
            gc.freeze()
        asked.clear()
        token = None
        start = time.process_time()
        async for event in build().run_stream(task=TASK):
            if token is None and isinstance(event, ModelClientStreamingChunkEvent):
                token = time.process_time()
        end = time.process_time()
        if index >= warmup and asked and token:
            totals.append((end - start) * 1000)
            before_model.append((asked[0] - start) * 1000)
            first_token.append((token - start) * 1000)
    gc.unfreeze()
    return {
        "runs": len(totals),
        "cpu_ms_per_run": summary(totals),
        "cpu_ms_before_model_client": summary(before_model),
        "cpu_ms_to_first_token": summary(first_token),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = {int(c) for c in args.cpus.split(",") if c.strip()}
    others = set(range(os.cpu_count() or 1)) - cpus
    os.environ.setdefault("AUTOGEN_DISABLE_RUNTIME_TRACING", "true")  # as in Chorus's workers
    with tempfile.TemporaryDirectory(prefix="autogen-alone-") as log_dir:
        port = procs.free_port()
        fakellm = procs.Process(
            "fakellm",
            procs.python_args("-m", "fakellm", "--host", "127.0.0.1", "--port", str(port)),
            dict(os.environ),
            Path(log_dir),
            others or None,
        )
        try:
            procs.wait_for_port(port, 30, fakellm)
            if cpus:
                os.sched_setaffinity(0, cpus)
            results = asyncio.run(measure(f"http://127.0.0.1:{port}/v1", args.runs, args.warmup))
        finally:
            fakellm.stop()
    for name, numbers in results.items():
        print(
            f"{name}: {numbers['runs']} runs, CPU per run median {numbers['cpu_ms_per_run']['median']} ms "
            f"(mean {numbers['cpu_ms_per_run']['mean']}); up to asking the model client "
            f"{numbers['cpu_ms_before_model_client']['median']} ms, up to the first token "
            f"{numbers['cpu_ms_to_first_token']['median']} ms (medians)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"cpus": sorted(cpus), "task": TASK, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
