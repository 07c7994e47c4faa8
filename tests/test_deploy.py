"""The files in deploy/ are well-formed and agree with each other: the Procfile runs under honcho (two web
servers, two workers and the offline model, really started), the compose file runs exactly the Procfile's
lines, nginx accepts its configs and, in front of a real daphne, upgrades WebSockets, streams SSE unbuffered,
serves static files and keeps /metrics inside; systemd accepts the units."""

import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import websockets
import yaml
from asgiref.sync import sync_to_async

from agents_app.domain import services
from tests.conftest import Stack
from tests.support import ROOT, Process, free_port, python_args, session_cookie, wait_for_port

DEPLOY = ROOT / "deploy"
SERVICES_OF_THE_PROCFILE = {"web", "worker", "fakellm"}


def procfile() -> dict[str, str]:
    from honcho.environ import parse_procfile

    return dict(parse_procfile((DEPLOY / "Procfile").read_text()).processes)


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_the_procfile_names_the_web_servers_workers_and_offline_model():
    processes = procfile()
    assert set(processes) == SERVICES_OF_THE_PROCFILE
    assert "chatproject.web" in processes["web"] and "${PORT:-8000}" in processes["web"]
    assert processes["worker"].endswith("manage.py runworker agent-runs")
    assert all(command.startswith("exec ") for command in processes.values()), "signals reach Python, not sh"
    check = subprocess.run([str(ROOT / ".venv/bin/honcho"), "-f", str(DEPLOY / "Procfile"), "check"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stderr


def test_the_compose_file_runs_the_procfile_and_everything_it_needs():
    services_ = compose()["services"]
    assert {"postgres", "redis", "nginx", "migrate"} | SERVICES_OF_THE_PROCFILE == set(services_)
    for name, line in procfile().items():
        command = services_[name]["command"]
        assert command[:2] == ["sh", "-c"]
        assert command[2].replace("$$", "$") == line, f"{name} runs the Procfile's line ($$ is compose's $)"
    assert services_["web"]["deploy"]["replicas"] == 2
    assert services_["worker"]["deploy"]["replicas"] == 2
    environment = services_["web"]["environment"]
    assert environment["REDIS_URL"] == "redis://redis:6379/0" and "@postgres:5432/" in environment["DATABASE_URL"]
    assert services_["worker"]["environment"] == environment, "every process gets the same settings"
    assert services_["worker"]["healthcheck"]["test"] == ["CMD", "python", "manage.py", "worker_ready"]
    assert "/readyz" in " ".join(services_["web"]["healthcheck"]["test"])
    assert "metrics:/srv/chorus/metrics" in services_["web"]["volumes"] == services_["worker"]["volumes"]
    mounts = " ".join(services_["nginx"]["volumes"])
    assert "./nginx/compose.conf:" in mounts and "./nginx/chorus-locations.conf:" in mounts


def test_docker_compose_accepts_the_compose_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed here (the compose file's structure is checked above)")
    env = {**os.environ, "DJANGO_SECRET_KEY": "x" * 50}
    run = subprocess.run([docker, "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr


# --- nginx ---


def nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if found is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    return found


def self_signed(directory) -> tuple[str, str]:
    certificate, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-keyout", key, "-out", certificate], check=True, capture_output=True, timeout=60)  # fmt: skip
    return certificate, key


def nginx_prefix(directory, site: str, replacements: dict[str, str]) -> str:
    """A private nginx prefix: a main config of its own (temp paths, pid, logs in `directory`) including the
    site file from deploy/nginx with `replacements` (addresses, ports, paths that only exist on a server), and
    the snippet where the site includes it from."""
    (directory / "snippets").mkdir(parents=True, exist_ok=True)
    shutil.copy(DEPLOY / "nginx" / "chorus-locations.conf", directory / "snippets" / "chorus-locations.conf")
    text = (DEPLOY / "nginx" / site).read_text()
    for old, new in replacements.items():
        assert old in text, f"{site} no longer has {old!r}"
        text = text.replace(old, new)
    (directory / "site.conf").write_text(text)
    user = "user root;\n" if os.geteuid() == 0 else ""  # the workers read the test's private directories
    temp = "".join(f"    {kind}_temp_path {directory}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                              "uwsgi", "scgi"))  # fmt: skip
    (directory / "nginx.conf").write_text(
        f"{user}pid {directory}/nginx.pid;\nerror_log {directory}/error.log notice;\nworker_processes 1;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n    access_log {directory}/access.log;\n{temp}    include site.conf;\n}}\n"
    )
    return str(directory / "nginx.conf")


def test_nginx_accepts_both_site_configs(tmp_path):
    binary = nginx()
    certificate, key = self_signed(tmp_path)
    host = tmp_path / "host"
    config = nginx_prefix(host, "chorus.conf", {
        "/etc/ssl/chorus/fullchain.pem": certificate, "/etc/ssl/chorus/privkey.pem": key,
        "listen 80;": f"listen 127.0.0.1:{free_port()};", "listen [::]:80;": "",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{free_port()} ssl http2;", "listen [::]:443 ssl http2;": "",
    })  # fmt: skip
    run = subprocess.run([binary, "-t", "-p", str(host), "-e", "stderr", "-c", config], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    docker = tmp_path / "compose"
    config = nginx_prefix(docker, "compose.conf", {"server web:8000;": "server 127.0.0.1:8000;",
                                                   "listen 80;": f"listen 127.0.0.1:{free_port()};"})  # fmt: skip
    run = subprocess.run([binary, "-t", "-p", str(docker), "-e", "stderr", "-c", config], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr


@pytest.mark.integration
@pytest.mark.asyncio
async def test_nginx_in_front_of_daphne_upgrades_websockets_streams_sse_and_serves_static(
    stack_env, process_logs, owner, team, tmp_path
):
    binary = nginx()
    certificate, key = self_signed(tmp_path)
    http_port, https_port = free_port(), free_port()
    origin = f"https://127.0.0.1:{https_port}"
    stack = Stack({**stack_env, "CHORUS_BEHIND_PROXY": "1", "CHORUS_HTTPS": "1", "CSRF_TRUSTED_ORIGINS": origin},
                  process_logs)  # fmt: skip
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)
    cookie = await sync_to_async(session_cookie)(owner)
    proxy = None
    try:
        stack.start_worker()
        web_ports = [stack.start_web(), stack.start_web("daphne-2")]
        prefix = tmp_path / "nginx"
        config = nginx_prefix(prefix, "chorus.conf", {
            "/etc/ssl/chorus/fullchain.pem": certificate, "/etc/ssl/chorus/privkey.pem": key,
            "listen 80;": f"listen 127.0.0.1:{http_port};", "listen [::]:80;": "",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl;", "listen [::]:443 ssl http2;": "",
            "server 127.0.0.1:8010;": f"server 127.0.0.1:{web_ports[0]};",
            "server 127.0.0.1:8011;": f"server 127.0.0.1:{web_ports[1]};",
            "alias /srv/chorus/var/staticfiles/;": f"alias {ROOT}/static/;",
        })  # fmt: skip
        proxy = Process("nginx", [binary, "-p", str(prefix), "-e", "stderr", "-c", config, "-g", "daemon off;"],
                        dict(os.environ), process_logs)  # fmt: skip
        wait_for_port(https_port, process=proxy)
        unverified = ssl.create_default_context()
        unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None  # a redirect is answered as it is, an HTTPError

        opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=unverified))

        def fetch(path, port=https_port, scheme="https"):
            try:
                with opener.open(f"{scheme}://127.0.0.1:{port}{path}", timeout=15) as response:
                    return response.status, dict(response.headers), response.read()
            except urllib.error.HTTPError as refused:
                return refused.code, dict(refused.headers), refused.read()

        status, _headers, body = await asyncio.to_thread(fetch, "/readyz")
        assert status == 200 and json.loads(body)["status"] == "ready"
        status, _headers, _body = await asyncio.to_thread(fetch, "/metrics")
        assert status == 404, "nginx keeps /metrics inside (through it, every client would be loopback)"
        status, headers, body = await asyncio.to_thread(fetch, "/static/chorus/chat.js")
        assert status == 200 and body == (ROOT / "static/chorus/chat.js").read_bytes()
        assert "max-age=3600" in headers.get("Cache-Control", "")
        status, headers, _body = await asyncio.to_thread(fetch, "/healthz", http_port, "http")
        assert status == 301 and headers["Location"] == "https://127.0.0.1/healthz"

        socket = await websockets.connect(
            f"wss://127.0.0.1:{https_port}/ws/conversations/{conversation.id}/", ssl=unverified,
            additional_headers={"Cookie": f"sessionid={cookie}", "Origin": origin},
        )  # fmt: skip
        assert json.loads(await asyncio.wait_for(socket.recv(), 10))["type"] == "hello"

        # SSE through nginx: each event must arrive while the answer is still being written, not at its end.
        sse_seen: list[tuple[float, dict]] = []

        def read_sse():
            request = urllib.request.Request(
                f"https://127.0.0.1:{https_port}/api/conversations/{conversation.id}/events/?after_seq=0",
                headers={"Cookie": f"sessionid={cookie}", "Accept": "text/event-stream"},
            )
            with urllib.request.urlopen(request, timeout=30, context=unverified) as response:
                for raw in response:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        sse_seen.append((time.monotonic(), event))
                        if event["type"] == "run.finished":
                            return

        reader = asyncio.create_task(asyncio.to_thread(read_sse))
        await asyncio.sleep(0.5)
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:20]] [[tps:10]]"}))
        received = []
        while not received or received[-1]["type"] != "run.finished":
            received.append(json.loads(await asyncio.wait_for(socket.recv(), 30)))
        await asyncio.wait_for(reader, 30)
        await socket.close()

        assert received[-1]["status"] == "succeeded", stack.logs_text()
        sse_events = [event for _at, event in sse_seen]
        assert [e["seq"] for e in sse_events] == [e["seq"] for e in received], "the same events, by SSE and socket"
        token_times = [at for at, event in sse_seen if event["type"] == "token"]
        assert len(token_times) >= 5
        assert token_times[-1] - token_times[0] > 1.0, "the tokens came through nginx as they were written"
    finally:
        if proxy is not None:
            proxy.stop()
        stack.stop()


# --- systemd ---


def test_systemd_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    units = tmp_path / "units"
    units.mkdir()
    environment = tmp_path / "chorus.env"
    environment.write_text("DJANGO_SECRET_KEY=x\n")
    for unit in (DEPLOY / "systemd").glob("chorus*"):
        if unit.suffix in (".service", ".target"):
            text = unit.read_text().replace("/etc/chorus/chorus.env", str(environment))
            (units / unit.name).write_text(text.replace("/srv/chorus", str(ROOT)))
    names = sorted(path.name for path in units.iterdir())
    assert names == ["chorus-fakellm.service", "chorus-web@.service", "chorus-worker@.service", "chorus.target"]
    for name in ("chorus-web@.service", "chorus-worker@.service", "chorus-fakellm.service"):
        text = (units / name).read_text()
        assert re.search(r"^Restart=always$", text, re.M) and re.search(r"^RestartSec=", text, re.M), name
    run = subprocess.run(
        [analyze, "verify", "--man=no", str(units / "chorus-web@8010.service"), str(units / "chorus-worker@1.service"),
         str(units / "chorus-fakellm.service"), str(units / "chorus.target")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
    )  # fmt: skip
    problems = [line for line in (run.stdout + run.stderr).splitlines() if "chorus" in line]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr


# --- honcho ---


def two_free_ports() -> int:
    """A free port whose next one is free too (honcho gives web.1 PORT and web.2 PORT + 1)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free ports in a row")


@pytest.mark.integration
@pytest.mark.asyncio
async def test_honcho_runs_the_procfile_two_web_servers_two_workers_and_the_model(stack_env, process_logs, owner, team):
    base, model_port = two_free_ports(), free_port()
    env = {**stack_env, "PYTHON": python_args()[0], "FAKELLM_PORT": str(model_port),
           "OPENAI_BASE_URL": f"http://127.0.0.1:{model_port}/v1"}  # fmt: skip
    env.pop("PORT", None)  # honcho would take it over -p
    honcho = Process("honcho", [str(ROOT / ".venv/bin/honcho"), "-f", str(DEPLOY / "Procfile"), "-d", str(ROOT),
                                "start", "-p", str(base), "-c", "web=2,worker=2"], env, process_logs)  # fmt: skip
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)
    cookie = await sync_to_async(session_cookie)(owner)
    try:
        for port in (base, base + 1, model_port):
            wait_for_port(port, timeout=60, process=honcho)
        socket = await websockets.connect(
            f"ws://127.0.0.1:{base + 1}/ws/conversations/{conversation.id}/",
            additional_headers={"Cookie": f"sessionid={cookie}", "Origin": f"http://127.0.0.1:{base + 1}"},
        )
        assert json.loads(await asyncio.wait_for(socket.recv(), 10))["type"] == "hello"
        await socket.send(json.dumps({"type": "send", "content": "[[tokens:8]]"}))
        received = []
        while not received or received[-1]["type"] != "run.finished":
            received.append(json.loads(await asyncio.wait_for(socket.recv(), 60)))
        await socket.close()
        assert received[-1]["status"] == "succeeded", honcho.log_tail(80)
        log = honcho.log_tail(400)
        for name in ("web.1", "web.2", "worker.1", "worker.2", "fakellm.1"):
            assert re.search(rf"{re.escape(name)}\s+\| ", log), f"honcho started {name}:\n{log}"
        # Both workers report once each has sent its first heartbeat; one may have answered before the other's.
        deadline = time.monotonic() + 30
        while True:
            run = subprocess.run(python_args("manage.py", "worker_ready"), cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
            report = json.loads(run.stdout)
            if len(report["workers"]) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert run.returncode == 0 and len(report["workers"]) >= 2, run.stdout + run.stderr
    finally:
        honcho.signal(signal.SIGINT)  # honcho stops every process it started
        try:
            honcho.popen.wait(30)
        finally:
            honcho.stop()
