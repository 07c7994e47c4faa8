"""The commands and code in docs/*.md that a reader would copy must run as written.

A fenced block runs in this test when the last non-blank line before its opening fence is a marker:

    <!-- runnable -->               a `sh` block runs in bash, a `python` block as a script
    <!-- runnable: shell -->        a `python` block is typed into `python manage.py shell`
    <!-- runnable: > FILE -->       as <!-- runnable -->, and what it prints is saved to FILE (for a later block)

The blocks of one page run in order, in one scratch directory (a reader's project root: it holds a link to
manage.py, and the project is on PYTHONPATH), with the virtualenv's python first on PATH, against the test
database. A block passes when it exits with status 0. Mark a block only if it can run here: no real model,
no server to start, nothing outside the test database.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support
from tests.support import ROOT

DOCS = ROOT / "docs"
MARKER_RE = re.compile(r"<!--\s*runnable(?::\s*(?P<how>.*?))?\s*-->")
FENCE_RE = re.compile(r"^(?P<fence>```+)(?P<language>[\w-]*)\s*$")


def runnable_blocks(text: str) -> list[tuple[str, str, str, int]]:
    """(how, language, code, line number) of each marked block of a page, in order."""
    blocks = []
    lines = text.splitlines()
    previous = ""  # the last non-blank line outside a block
    index = 0
    while index < len(lines):
        fence = FENCE_RE.match(lines[index])
        if fence is None:
            if lines[index].strip():
                previous = lines[index].strip()
            index += 1
            continue
        start = index
        index += 1
        while index < len(lines) and lines[index].strip() != fence.group("fence"):
            index += 1
        marker = MARKER_RE.fullmatch(previous)
        if marker is not None:
            code = "\n".join(lines[start + 1 : index]) + "\n"
            blocks.append(((marker.group("how") or "").strip(), fence.group("language"), code, start + 1))
        previous = ""
        index += 1
    return blocks


def pages_with_runnable_blocks() -> list[Path]:
    return [page for page in sorted(DOCS.glob("*.md")) if runnable_blocks(page.read_text())]


def test_the_marked_blocks_are_found():
    blocks = runnable_blocks((DOCS / "teams.md").read_text())
    assert [(how, language) for how, language, _code, _line in blocks] == [
        ("", "sh"),
        ("> tutor.json", "python"),
        ("shell", "python"),
    ]
    sample = "<!-- runnable: shell -->\n\n```python\nprint(1)\n```\n\n```sh\nnot marked\n```\n"
    assert runnable_blocks(sample) == [("shell", "python", "print(1)\n", 3)]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("page", pages_with_runnable_blocks(), ids=lambda page: page.name)
def test_runnable_blocks_run_as_written(page, tmp_path):
    (tmp_path / "manage.py").symlink_to(ROOT / "manage.py")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "chatproject.test_settings",
        "DATABASE_URL": support.test_database_url(),
    }
    for how, language, code, line in runnable_blocks(page.read_text()):
        where = f"{page.name}, the {language} block at line {line}"
        if how == "shell":
            assert language == "python", f"{where}: only python blocks go into manage.py shell"
            args, stdin = [sys.executable, "manage.py", "shell"], code
        elif language == "python":
            args, stdin = [sys.executable, "-"], code
        elif language in ("sh", "bash", "shell"):
            args, stdin = ["bash", "-euo", "pipefail", "-c", code], None
        else:
            raise AssertionError(f"{where}: a {language!r} block cannot run")
        run = subprocess.run(args, input=stdin, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{where} failed:\n{run.stdout}\n{run.stderr}"
        if how.startswith(">"):
            (tmp_path / how[1:].strip()).write_text(run.stdout)
