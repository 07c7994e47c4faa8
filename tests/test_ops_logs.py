"""Structured logs: the JSON and text formats, and ids bound once reaching every line about the work, in the
tasks, threads and other event loops it is handed to."""

import asyncio
import io
import json
import logging
import threading

import pytest
from asgiref.sync import sync_to_async

from agents_app.ops import logs


@pytest.fixture
def captured():
    """A logger writing JSON lines and text lines, through the filter settings.LOGGING installs."""
    json_out, text_out = io.StringIO(), io.StringIO()
    logger = logging.getLogger("agents_app.test_ops_logs")
    handlers = []
    for stream, formatter in ((json_out, logs.JsonFormatter()), (text_out, logs.TextFormatter())):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(logs.ContextFilter())
        logger.addHandler(handler)
        handlers.append(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, json_out, text_out
    for handler in handlers:
        logger.removeHandler(handler)
    logger.propagate = True


def json_lines(stream) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_has_the_time_level_logger_message_and_the_bound_ids(captured):
    logger, json_out, text_out = captured
    with logs.context(run_id="r-1", conversation_id="c-1", user_id=7):
        logger.info("run %s succeeded", "r-1", extra={"tokens": 30, "when": object()})
        logger.warning("an override", extra={"run_id": "r-2"})
    logger.info("about nothing")
    first, second, third = json_lines(json_out)
    assert first["message"] == "run r-1 succeeded"
    assert (first["level"], first["logger"]) == ("INFO", "agents_app.test_ops_logs")
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert isinstance(first["pid"], int)
    assert (first["run_id"], first["conversation_id"], first["user_id"]) == ("r-1", "c-1", "7")
    assert first["tokens"] == 30 and first["when"].startswith("<object"), "an extra that is not JSON is its text"
    assert second["run_id"] == "r-2" and second["conversation_id"] == "c-1", "extra= wins over the bound id"
    assert "run_id" not in third and "conversation_id" not in third, "the context ended with its block"

    text = text_out.getvalue().splitlines()
    assert text[0].endswith("INFO agents_app.test_ops_logs run r-1 succeeded [run=r-1 conversation=c-1 user=7]")
    assert text[2].endswith("INFO agents_app.test_ops_logs about nothing")


def test_a_traceback_stays_inside_its_json_line(captured):
    logger, json_out, text_out = captured
    try:
        raise ValueError('bad "quoted"\nsecond line')
    except ValueError:
        with logs.context(run_id="r-9"):
            logger.exception("it failed")
    (line,) = json_out.getvalue().splitlines()  # one line, the traceback escaped inside it
    record = json.loads(line)
    assert record["message"] == "it failed" and record["run_id"] == "r-9"
    assert "Traceback" in record["exc_info"] and "ValueError" in record["exc_info"]
    head = text_out.getvalue().splitlines()[0]
    assert head.endswith("it failed [run=r-9]"), "the ids go on the first line, the traceback after it"


def test_only_known_ids_may_be_bound():
    with pytest.raises(ValueError, match="not a log context key"):
        logs.bind(password="x")


@pytest.mark.asyncio
async def test_bound_ids_follow_the_work_into_tasks_threads_and_other_loops(captured):
    logger, json_out, _text_out = captured

    async def in_a_task():
        logger.info("task")

    def in_a_thread():  # as database_sync_to_async runs services
        logger.info("thread")

    other_loop = asyncio.new_event_loop()
    runner = threading.Thread(target=other_loop.run_forever, daemon=True)
    runner.start()

    async def on_the_agent_loop():  # as a turn runs on the worker's agent loop
        logger.info("agent loop")

    async def one_run(run_id):
        logs.bind(run_id=run_id, conversation_id=f"c-{run_id}")  # a run's own task, as worker.execute does
        await asyncio.create_task(in_a_task())
        await sync_to_async(in_a_thread)()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(on_the_agent_loop(), other_loop))

    try:
        await asyncio.gather(one_run("a"), one_run("b"))
    finally:
        other_loop.call_soon_threadsafe(other_loop.stop)
        runner.join(5)
        other_loop.close()
    logger.info("after")
    records = json_lines(json_out)
    by_message = {}
    for record in records:
        by_message.setdefault(record["message"], []).append(record.get("run_id"))
    assert sorted(by_message["task"]) == sorted(by_message["thread"]) == sorted(by_message["agent loop"]) == ["a", "b"]
    assert by_message["after"] == [None], "two runs at once, each with its own ids, none left behind"
    assert all(record.get("conversation_id") == f"c-{record['run_id']}" for record in records if record.get("run_id"))
