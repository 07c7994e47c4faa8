"""The newcomer's path: friendly 404 and 500 pages (with DEBUG on, as `make run` runs, and off), and a demo
password that a second `make run` says how to reset, with a command that works exactly as printed."""

import io
import os
import re
import shlex
import subprocess

import pytest
from django.conf import global_settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.urls import include, path

from tests import support
from tests.support import ROOT


def boom(request):
    raise RuntimeError("a bug in a view")


# This module is the URLconf of the error page tests: Chorus's own routes, and one view that fails.
urlpatterns = [path("boom/", boom), path("", include("chatproject.urls"))]


@pytest.fixture
def failing_urls(settings):
    settings.ROOT_URLCONF = __name__


def assert_no_inline_code(html: str) -> None:
    """The strict Content-Security-Policy holds: scripts are files, nothing carries a style attribute."""
    assert all('src="' in attrs for attrs in re.findall(r"<script\b([^>]*)>", html))
    assert " style=" not in html and "<style" not in html


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False])
def test_a_missing_page_is_a_friendly_404_in_both_modes(client, owner, settings, debug):
    settings.DEBUG = debug
    client.force_login(owner)
    response = client.get("/no/such/page/")
    html = response.content.decode()
    assert response.status_code == 404
    assert "<h1>Page not found</h1>" in html and "Back to your conversations" in html
    assert "/no/such/page/" in html and "DEBUG = True" not in html, "not Django's debug page"
    assert ("CHORUS_DEBUG_PAGES=1" in html) is debug, "only developers are told how to see the debug page"
    assert_no_inline_code(html)
    assert "content.css" in html


@pytest.mark.django_db
def test_someone_elses_conversation_is_the_same_friendly_404(client, owner, other_user, team, settings):
    from agents_app.domain import services

    settings.DEBUG = True
    theirs = services.conversation_create(owner=other_user, team=team)
    client.force_login(owner)
    response = client.get(f"/conversations/{theirs.id}/")
    assert response.status_code == 404 and "<h1>Page not found</h1>" in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False])
def test_a_failing_page_is_a_friendly_500_and_the_traceback_is_logged(failing_urls, settings, caplog, debug):
    settings.DEBUG = debug
    response = Client(raise_request_exception=False).get("/boom/")
    html = response.content.decode()
    assert response.status_code == 500
    assert "<h1>Something went wrong</h1>" in html and "RuntimeError" not in html
    assert ("CHORUS_DEBUG_PAGES=1" in html) is debug
    assert_no_inline_code(html)
    logged = [r for r in caplog.records if r.name == "django.request" and r.exc_info]
    assert logged and "a bug in a view" in str(logged[0].exc_info[1]), "the traceback is still in the log"


@pytest.mark.django_db
def test_developers_can_ask_for_djangos_debug_pages(client, failing_urls, settings):
    settings.DEBUG = True
    settings.CHORUS_DEBUG_PAGES = True
    assert "DEBUG = True" in client.get("/no/such/page/").content.decode()
    failing = Client(raise_request_exception=False).get("/boom/")
    assert failing.status_code == 500 and "a bug in a view" in failing.content.decode()


@pytest.mark.django_db
def test_the_api_keeps_its_json_404(client, owner, settings):
    settings.DEBUG = True
    client.force_login(owner)
    response = client.get("/api/conversations/00000000-0000-0000-0000-000000000000/")
    assert response.status_code == 404 and response["Content-Type"].startswith("application/json")


def demo_user(*args: str) -> str:
    out = io.StringIO()
    call_command("demo_user", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_a_second_run_prints_a_reset_command_that_works_as_printed(tmp_path, settings):
    # The command runs with the real settings, whose password hasher the test settings leave out: read it here.
    settings.PASSWORD_HASHERS = [*settings.PASSWORD_HASHERS, *global_settings.PASSWORD_HASHERS]
    first = demo_user()
    password = re.search(r"password (\S+)", first).group(1)
    user = get_user_model().objects.get(username="demo")
    assert user.check_password(password)

    second = demo_user()
    assert password not in second, "the password is shown once only"
    command = re.search(r"A new one: (.+)$", second.strip()).group(1)
    assert command == "make demo-password"
    readme = (ROOT / "README.md").read_text()
    assert f"\n{command}\n" in readme, "the README shows the same command"

    # Typed in a fresh terminal at the project's root: no DEBUG, no secret key, no settings module in the
    # environment (here only the database is the test's, and the development key's folder a temporary one).
    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "DJANGO_SECRET_KEY", "DJANGO_SETTINGS_MODULE")}
    env |= {"DATABASE_URL": support.test_database_url(), "CHORUS_VAR_DIR": str(tmp_path)}
    done = subprocess.run(shlex.split(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    new_password = re.search(r"Demo login reset: username demo, password (\S+)", done.stdout).group(1)
    user.refresh_from_db()
    assert user.check_password(new_password) and not user.check_password(password)


@pytest.mark.django_db(transaction=True)
def test_the_readmes_admin_command_makes_an_administrator_from_a_fresh_terminal(tmp_path):
    assert "\nmake admin\n" in (ROOT / "README.md").read_text()
    # As typed, with the answers it would ask for given up front (createsuperuser's own --noinput).
    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "DJANGO_SECRET_KEY", "DJANGO_SETTINGS_MODULE")}
    env |= {"DATABASE_URL": support.test_database_url(), "CHORUS_VAR_DIR": str(tmp_path),
            "DJANGO_SUPERUSER_PASSWORD": "boss-password-1"}  # fmt: skip
    args = ["make", "admin", "ARGS=--noinput --username boss --email boss@example.com"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    boss = get_user_model().objects.get(username="boss")
    assert boss.is_staff and boss.is_superuser


def test_make_run_starts_the_offline_model_in_character_and_the_readme_says_how_to_stop():
    run = (ROOT / "scripts" / "run.sh").read_text()
    assert "manage.py fakellm --host 127.0.0.1" in run and "--demo-roles" in run
    readme = (ROOT / "README.md").read_text()
    assert "Ctrl+C" in readme and "What to try first" in readme
