"""The parts' arrows (docs/architecture.md): the import contracts hold, and a web server never loads AutoGen."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A web process that imports any of these pays for AutoGen (or the runner or worker that bring it).
AGENT_MODULES = ("autogen_agentchat", "autogen_core", "autogen_ext", "openai", "agents_app.runner", "agents_app.worker")

LOADED_BY_A_WEB_SERVER = """
import json, sys
import chatproject.asgi  # the application daphne serves
from django.urls import get_resolver
from django.test import Client

get_resolver().url_patterns  # every view module: pages, API, AG-UI, admin
Client().get("/accounts/login/")  # and one request through the whole stack
print(json.dumps(sorted(m for m in sys.modules if m.startswith(tuple(sys.argv[1:])))))
"""


def modules_loaded_by_the_web_application(embedded: bool) -> list[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "chatproject.settings",
        "DEBUG": "1",
        "DATABASE_URL": "sqlite:///:memory:",
        "REDIS_URL": "" if embedded else "redis://127.0.0.1:6379/0",  # configured, never connected to here
        "CHORUS_EMBEDDED_WORKER": "1" if embedded else "0",
    }
    done = subprocess.run(
        [sys.executable, "-c", LOADED_BY_A_WEB_SERVER, *AGENT_MODULES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_web_server_loads_no_autogen_no_runner_and_no_worker():
    assert modules_loaded_by_the_web_application(embedded=False) == []


def test_the_single_process_mode_does_load_the_worker_so_the_probe_sees_it():
    loaded = modules_loaded_by_the_web_application(embedded=True)
    assert "agents_app.worker.agent" in loaded and "autogen_agentchat" in loaded


def test_the_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts: runner without Django, web without AutoGen, domain
    without transport, admin through the domain, fan-out as transport only, web and worker independent."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 kept, 0 broken" in done.stdout


STORED_PROVIDERS = (
    "agents_app.runner.TappedModelClient",
    "agents_app.runner.RegistryTool",
    "agents_app.runner.FallbackSelectorGroupChat",
    "agents_app.runner.TextFromSourcesTermination",
)


def test_the_class_paths_stored_team_configs_name_still_load_and_are_still_written():
    """Team rows and exports written before the runner became a package name these paths: they must resolve,
    and what Chorus writes now must name the same ones."""
    import importlib

    from agents_app import runner

    for provider in STORED_PROVIDERS:
        module, _, name = provider.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert cls is getattr(runner, name) and cls.component_provider_override == provider
    assert runner.registry_tool_config("calculator")["provider"] == "agents_app.runner.RegistryTool"
