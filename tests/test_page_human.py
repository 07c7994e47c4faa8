"""A team's question to the person on the chat page, in a real Chromium against real daphne, a worker and the
offline model: the research desk with approval asks before its tool runs; the card shows on its turn with the
options as buttons, survives a reload, marks the conversation "waiting for you" in the sidebar, and Approve lets
the run go on."""

import pytest

from agents_app.domain import services
from agents_app.models import Team
from tests.test_browser import (  # noqa: F401 - fixtures
    ANSWER,
    chromium_executable,
    open_page,
    screenshot,
    send,
    wait_answer,
    wait_connected,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CARD = "li.run .input-request"


@pytest.fixture
def approval_conversation(owner, team):
    return services.conversation_create(owner=owner, team=Team.objects.get(slug="research-desk-approval"))


def test_a_question_shows_as_a_card_survives_a_reload_and_approve_goes_on(approval_conversation, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    page.goto(f"/conversations/{approval_conversation.id}/")
    wait_connected(page)

    send(page, 'What is 17*23? [[analyst>tool:calculator {"expression": "17*23"}]]')
    wait_until(page, f"() => document.querySelector('{CARD}')", what="the team's question")
    card = page.locator(CARD)
    assert "calculator" in card.locator(".prompt").text_content()
    assert card.locator(".option").all_text_contents() == ["Approve", "Reject"]
    assert page.locator("#connection-status").text_content().strip() == "Waiting for you"
    assert page.locator("#send-button").is_enabled(), "a message sent now answers the question"
    wait_until(page, "() => !document.querySelector('#conversation-list .badge.waiting').hidden",
               what="the sidebar's waiting badge")  # fmt: skip
    screenshot(page, "page-input-request")

    page.reload()
    wait_until(page, "() => window.chorusConnected", what="the socket, after a reload")
    assert page.locator("#connection-status").text_content().strip() == "Waiting for you"
    assert page.locator(CARD).count() == 1, "the open question is back after a reload"
    wait_until(page, "() => !document.querySelector('#conversation-list .badge.waiting')?.hidden",
               what="the badge from the conversation list (waiting_for_input)")  # fmt: skip

    page.locator(f"{CARD} .option", has_text="Approve").click()
    wait_until(page, f"() => !document.querySelector('{CARD}')", what="the card to close once answered")
    wait_answer(page)
    assert "391" in page.locator("li.run .step-list").text_content(), "the approved call ran"
    wait_until(page, "() => document.querySelector('#conversation-list .badge.waiting').hidden",
               what="the badge to go")  # fmt: skip
    assert console.errors == [] and console.csp_violations() == []
