"""The examples of docs/api.md run as written, against a real daphne, worker, Redis and the offline model.

A block runs when the line before its fence is `<!-- api-example -->` (tests/test_docs.py runs the blocks that
need no server; these need one). Its environment has `CHORUS` (the server's address) and `TOKEN` (a token of a
test person). The `sh` blocks run in order in one bash, so a later one uses what an earlier one set, as a
reader's terminal would; each `python` block runs as a script; each `typescript` block is type-checked against
the installed `@ag-ui/client` and run by node (tests/agui_client/run-ts.mjs).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents_app.models import Conversation
from agents_app.web import tokens
from tests.support import ROOT
from tests.test_docs import runnable_blocks

PAGE = ROOT / "docs" / "api.md"
MARKER = "<!-- api-example -->"
CLIENT_DIR = ROOT / "tests" / "agui_client"
TIMEOUT = 120  # seconds per block: a bound, not a speed claim

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def examples() -> list[tuple[str, str, int]]:
    """(language, code, line) of each example block of docs/api.md, in order."""
    text = PAGE.read_text()
    assert "<!-- runnable" not in text, "docs/api.md examples need a server: mark them <!-- api-example -->"
    return [(language, code, line) for _how, language, code, line in runnable_blocks(
        text.replace(MARKER, "<!-- runnable -->"))]  # fmt: skip


def test_every_kind_of_example_is_there():
    languages = [language for language, _code, _line in examples()]
    assert languages.count("sh") >= 3 and languages.count("python") >= 3 and "typescript" in languages


@pytest.fixture
def env(stack, owner, team, tmp_path) -> dict[str, str]:
    _, secret = tokens.token_create(user=owner, name="docs examples")
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CHORUS": f"http://127.0.0.1:{stack.web_port}",
        "TOKEN": secret,
    }


def test_the_examples_run_as_written(env, tmp_path, owner):
    blocks = examples()
    shell = "\n".join(code for language, code, _line in blocks if language == "sh")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", shell], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=TIMEOUT * 3)  # fmt: skip
    assert run.returncode == 0, f"the sh examples failed:\n{run.stdout}\n{run.stderr}"
    assert "event: run.finished" in run.stdout and '"type":"RUN_FINISHED"' in run.stdout
    assert '"title": "Sixes and sevens"' in run.stdout and '"code": "no_active_run"' in run.stdout
    assert "204" in run.stdout.splitlines()

    for language, code, line in blocks:
        where = f"docs/api.md, the {language} block at line {line}"
        if language == "python":
            args, stdin = [sys.executable, "-"], code
        elif language == "typescript":
            script = tmp_path / f"example-{line}.ts"
            script.write_text(code)
            args, stdin = ["node", str(CLIENT_DIR / "run-ts.mjs"), str(script)], None
        else:
            continue
        run = subprocess.run(args, input=stdin, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT)  # fmt: skip
        assert run.returncode == 0, f"{where} failed:\n{run.stdout}\n{run.stderr}"
        assert run.stdout.strip(), f"{where} printed nothing"
    titles = set(Conversation.objects.filter(owner=owner).values_list("title", flat=True))
    assert "From Python" in titles and "Sixes and sevens" not in titles  # the curl one was deleted
