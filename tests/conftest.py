"""Fixtures: a small cast of users, the shipped teams, the offline model server, and the real process stack."""

import os
import time

import pytest
import redis

from agents_app.domain import services
from agents_app.models import Team
from agents_app.teams import seed_builtin_teams
from agents_app.web import tokens
from tests.support import Process, free_port, python_args, session_cookie, test_database_url, wait_for_port

REDIS_URL = os.environ.get("CHORUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


@pytest.fixture
def team(db) -> Team:
    # Transactional tests flush every table, the migration-seeded teams included: seed them again.
    seed_builtin_teams(Team)
    return Team.objects.get(slug="assistant")


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user("owner", password="owner-password-1")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("other", password="other-password-1")


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("staff", password="staff-password-1")


@pytest.fixture
def conversation(owner, team):
    return services.conversation_create(owner=owner, team=team)


@pytest.fixture
def cookie(owner):
    """The owner's session cookie, for a browser or a socket."""
    return session_cookie(owner)


@pytest.fixture
def api(client, owner):
    """A program with the owner's API token: no cookie, no CSRF token."""
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {tokens.token_create(user=owner, name='tests')[1]}"
    return client


@pytest.fixture(scope="session", autouse=True)
def test_database_released(django_db_setup, django_db_blocker):
    """Before the test database is dropped: wait for the sessions of the processes the tests stopped to end.

    A stopped daphne or worker closes its connection as it exits, but PostgreSQL ends that session a moment
    later; dropping the database meanwhile fails ("being accessed by other users"). A session still there
    after 10 s is a leak: it is named, then ended, so the drop itself still succeeds."""
    yield
    with django_db_blocker.unblock():
        from django.db import connection

        if connection.vendor != "postgresql":
            return
        name = connection.settings_dict["NAME"]
        others = "SELECT pid, application_name, state, left(query, 120) FROM pg_stat_activity "
        others += "WHERE datname = %s AND pid <> pg_backend_pid()"
        deadline = time.monotonic() + 10
        with connection.cursor() as cursor:
            cursor.execute(others, [name])
            while (sessions := cursor.fetchall()) and time.monotonic() < deadline:
                time.sleep(0.1)
                cursor.execute(others, [name])
            for pid, application, state, query in sessions:
                print(f"\nsession {pid} ({application!r}, {state}) still held the test database: {query!r}")
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        connection.close()


@pytest.fixture(scope="session")
def process_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("process-logs")


@pytest.fixture(scope="session")
def fakellm_url(process_logs):
    """The offline model server as a real process, at 200 tokens/s unless a request says otherwise."""
    port = free_port()
    args = python_args("-m", "fakellm", "--host", "127.0.0.1", "--port", str(port), "--tps", "200")
    process = Process("fakellm", args, os.environ.copy(), process_logs)
    wait_for_port(port, process=process)
    yield f"http://127.0.0.1:{port}/v1"
    process.stop()


@pytest.fixture
def model(settings, fakellm_url):
    """Point this process's model clients at the offline model server."""
    settings.OPENAI_BASE_URL = fakellm_url
    settings.OPENAI_API_KEY = ""
    return fakellm_url


@pytest.fixture(scope="session")
def redis_url():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        raise RuntimeError(f"The tests need Redis at {REDIS_URL} (set CHORUS_TEST_REDIS_URL): {exc}") from None
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


class Stack:
    """daphne and agent workers as real processes, sharing the test database and a real Redis."""

    def __init__(self, env: dict[str, str], logs):
        self.env = env
        self.logs = logs
        self.processes: list[Process] = []
        self.web_port: int | None = None

    def start_web(self, name: str = "daphne", extra_args: tuple[str, ...] = (), port: int | None = None) -> int:
        """Start a daphne (on `port`, or a free one); `extra_args` go on its command line (e.g.
        `("--ping-interval", "1")`)."""
        port = port or free_port()
        daphne = python_args(
            "-m", "chatproject.web", "-b", "127.0.0.1", "-p", str(port), *extra_args, "chatproject.asgi:application"
        )
        process = Process(name, daphne, self.env, self.logs)
        self.processes.append(process)
        wait_for_port(port, process=process)
        self.web_port = self.web_port or port
        return port

    def start_worker(self, name: str = "worker") -> Process:
        process = Process(name, python_args("manage.py", "runworker", "agent-runs"), self.env, self.logs)
        self.processes.append(process)
        return process

    def ws_url(self, conversation_id, port: int | None = None) -> str:
        return f"ws://127.0.0.1:{port or self.web_port}/ws/conversations/{conversation_id}/"

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.name} (pid {p.pid})\n{p.log_tail()}" for p in self.processes)


@pytest.fixture
def stack_env(transactional_db, redis_url, fakellm_url, tmp_path_factory):
    return {
        **os.environ,
        # Uploads of the processes' tests (schemathesis's included) land in a temporary folder, not in var/.
        "CHORUS_ATTACHMENT_DIR": str(tmp_path_factory.mktemp("attachments")),
        "DJANGO_SETTINGS_MODULE": "chatproject.test_settings",
        "DATABASE_URL": test_database_url(),
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": fakellm_url,
        "OPENAI_API_KEY": "",
        "CHORUS_EMBEDDED_WORKER": "0",
        "CHORUS_WORKER_POLL_SECONDS": "0.5",
        "CHORUS_HEARTBEAT_SECONDS": "1",
        "DEBUG": "0",
    }


@pytest.fixture
def stack(stack_env, process_logs, request):
    """A web server and one agent worker; more can be started. Logs are printed when a test fails."""
    running = Stack(stack_env, process_logs)
    running.start_worker()
    running.start_web()
    yield running
    running.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(running.logs_text())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


class ReliabilityReport:
    """Rows measured by the fault-injection tests, written as a Markdown table when the session ends."""

    def __init__(self):
        self.rows: list[dict[str, str]] = []

    def add(self, fault: str, injection: str, outcome: str, **measured) -> None:
        numbers = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in measured.items())
        self.rows.append({"fault": fault, "injection": injection, "outcome": outcome, "measured": numbers})

    def markdown(self) -> str:
        lines = [
            "| Fault | How the test injects it | What the user gets | Measured |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {r['fault']} | {r['injection']} | {r['outcome']} | {r['measured']} |" for r in self.rows]
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def reliability():
    report = ReliabilityReport()
    yield report
    if not report.rows:
        return
    from pathlib import Path

    from django.conf import settings

    text = report.markdown()
    # make test's second pass (every fast path off) keeps its own table beside the first pass's.
    stock_paths = os.environ.get("CHORUS_FAST_PATHS", "1").strip().lower() in ("0", "false", "no", "off")
    out = Path(settings.VAR_DIR) / ("reliability-table-stock-paths.md" if stock_paths else "reliability-table.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    # `CHORUS_UPDATE_DOCS=1 make test` refreshes the table in docs/reliability.md from this run.
    if os.environ.get("CHORUS_UPDATE_DOCS") == "1":
        doc = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
        head, marker, _ = doc.read_text().partition("<!-- table -->\n")
        doc.write_text(head + marker + text)
