"""Web servers and workers run on uvloop unless CHORUS_UVLOOP=0 turns it off (chatproject/eventloop.py)."""

import os
import subprocess

import pytest

from tests.support import ROOT, python_args

# What a web server started with `python -m chatproject.web` runs on: daphne's own loop, made on import.
WEB_LOOP = "import chatproject.web, daphne.server as s; print(type(s.twisted_loop).__module__)"
# What a worker's loops are made from once `manage.py runworker` has installed its policy.
WORKER_LOOP = (
    "import django; django.setup(); from chatproject import eventloop; eventloop.install(); "
    "from agents_app.runner import AgentLoop; print(type(AgentLoop().loop).__module__)"
)


@pytest.mark.parametrize(("setting", "module"), [(None, "uvloop"), ("1", "uvloop"), ("0", "asyncio.unix_events")])
@pytest.mark.parametrize("code", [WEB_LOOP, WORKER_LOOP], ids=["web", "worker"])
def test_processes_run_on_uvloop_unless_it_is_turned_off(code, setting, module):
    env = {key: value for key, value in os.environ.items() if key != "CHORUS_UVLOOP"}
    env["DJANGO_SETTINGS_MODULE"] = "chatproject.test_settings"
    if setting is not None:
        env["CHORUS_UVLOOP"] = setting
    done = subprocess.run(python_args("-c", code), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == module
