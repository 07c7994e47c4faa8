"""The browsable API docs (/api/docs/) and the API tokens page in a real headless Chromium, under the site's strict
Content-Security-Policy (no CDN, no inline script): Swagger UI shows every operation, and a person makes a token,
sees it once, and revokes it."""

import pytest

from tests.test_browser import chromium_executable, open_page, wait_until  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def test_the_api_docs_render_every_operation_without_breaking_the_csp(open_page):  # noqa: F811
    page, console = open_page()
    page.goto("/api/docs/")
    wait_until(page, "() => document.querySelectorAll('.opblock').length >= 12", what="Swagger UI's operations")
    summaries = page.locator(".opblock-summary-path").all_text_contents()
    assert any("/api/agui/" in path for path in summaries)
    assert any("/api/conversations/{conversation_id}/cancel/" in path.replace("\u200b", "") for path in summaries)
    assert console.csp_violations() == [] and console.errors == []


def test_a_person_makes_a_token_sees_it_once_and_revokes_it(open_page, cookie, owner):  # noqa: F811
    page, console = open_page(cookie)
    page.goto("/settings/")
    page.fill("#id_name", "laptop script")
    page.check("#id_read_only")
    page.click("#create-token")
    secret = page.input_value("#new-token")
    assert secret.startswith("chorus_")
    assert "read-only" in page.locator("table.tokens").inner_text()
    page.goto("/settings/")
    assert secret not in page.content(), "shown once"
    page.click("table.tokens button:has-text('Revoke')")
    assert "revoked" in page.locator("table.tokens").inner_text()
    assert console.csp_violations() == [] and console.errors == []
