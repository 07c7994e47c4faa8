"""The API describes itself: an OpenAPI 3.1 document generated from the code (django-ninja) at /api/schema/, its
browsable docs at /api/docs/ under the site's strict Content-Security-Policy, and schemathesis, run against a
real daphne, worker and Redis, finds no server error and no answer that breaks the document."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.staticfiles import finders

from agents_app.domain import services
from agents_app.web import tokens

pytestmark = pytest.mark.django_db

ROUTES = {
    "/api/teams/": {"get"},
    "/api/conversations/": {"get", "post"},
    "/api/conversations/{conversation_id}/": {"get", "patch", "delete"},
    "/api/conversations/{conversation_id}/messages/": {"get", "post"},
    "/api/conversations/{conversation_id}/events/": {"get"},
    "/api/conversations/{conversation_id}/cancel/": {"post"},
    "/api/conversations/{conversation_id}/input/": {"post"},
    "/api/conversations/{conversation_id}/attachments/": {"post"},
    "/api/conversations/{conversation_id}/attachments/{attachment_id}/": {"get", "delete"},
    "/api/conversations/{conversation_id}/resend/": {"post"},
    "/api/conversations/{conversation_id}/messages/{message_id}/feedback/": {"put", "delete"},
    "/api/conversations/{conversation_id}/share-links/": {"get", "post"},
    "/api/conversations/{conversation_id}/share-links/{link_id}/": {"delete"},
    "/api/agui/": {"post"},
    "/api/agui/{team_slug}/": {"post"},
}


def test_the_schema_is_openapi_3_1_with_every_route_and_both_ways_in(client):
    response = client.get("/api/schema/")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.1")
    assert {
        path: set(methods) & {"get", "post", "put", "patch", "delete"} for path, methods in schema["paths"].items()
    } == ROUTES
    schemes = schema["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes["BearerToken"].items()
    assert (schemes["SessionCookie"]["in"], schemes["SessionCookie"]["name"]) == ("cookie", "sessionid")
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            assert {"401", "500"} <= set(operation["responses"]), f"{method} {path}"
            error = operation["responses"]["401"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/Error"}
    events = schema["paths"]["/api/conversations/{conversation_id}/events/"]["get"]["responses"]["200"]
    assert "text/event-stream" in events["content"]
    agui = schema["paths"]["/api/agui/"]["post"]
    assert agui["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RunAgentInput"
    }
    assert {"threadId", "runId", "messages"} <= set(schema["components"]["schemas"]["RunAgentInput"]["properties"])


def test_the_docs_page_serves_its_own_files_under_the_sites_csp(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    csp = response["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe" not in csp and "cdn" not in html.lower()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    runnable = [(attrs, body) for attrs, body in scripts if 'type="application/json"' not in attrs]
    assert runnable and all('src="/static/' in attrs and body.strip() == "" for attrs, body in runnable)
    for asset in re.findall(r'(?:src|href)="/static/([^"]+)"', html):
        assert finders.find(asset), f"{asset} is not shipped"


def test_the_schema_and_docs_need_no_login_but_the_routes_do(client):
    assert client.get("/api/schema/").status_code == 200
    assert client.get("/api/teams/").status_code == 401


# --- schemathesis ---------------------------------------------------------------------------------------------

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def schemathesis_run(url: str, secret: str, config: Path, *extra: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "schemathesis"
    return subprocess.run(
        [str(cli), "--config-file", str(config), "run", url, "--header", f"Authorization: Bearer {secret}",
         "--checks", CHECKS, "--max-examples", "8", "--seed", "21", "--request-timeout", "60", "--no-color",
         "--workers", "1",
         # The events stream never ends on its own (it is followed live): tests/test_sse.py reads it.
         # The upload: a body that is not valid multipart is refused by the web server itself (Twisted, under
         # daphne, parses multipart before any application sees it) with a bare 400, no JSON; its answers are
         # checked by tests/test_attachments.py and tests/test_browser.py.
         "--exclude-path-regex", "/events/$|/attachments/$", *extra],
        capture_output=True, text=True, timeout=900, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(stack, owner, team, tmp_path):
    _, secret = tokens.token_create(user=owner, name="schemathesis")
    url = f"http://127.0.0.1:{stack.web_port}/api/schema/"
    # Random ids (404s and refusals) on every route...
    anywhere = tmp_path / "anywhere.toml"
    anywhere.write_text("")
    run = schemathesis_run(url, secret, anywhere)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    # ...then the routes of one real conversation (renamed, written to, stopped; not deleted, so it stays).
    conversation = services.conversation_create(owner=owner, team=team)
    real = tmp_path / "real.toml"
    real.write_text(f'[parameters]\n"path.conversation_id" = "{conversation.id}"\n')
    run = schemathesis_run(url, secret, real, "--exclude-method", "DELETE")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
