"""The chat page's turns in a real Chromium against real daphne, a worker and the offline model: a failed turn
says why on the turn (after a reload too) and can be retried or edited; a message typed while the team answers is
never lost; regenerate replaces the answer; messages and code blocks copy."""

import pytest

from agents_app.domain import services
from tests.test_browser import (  # noqa: F401 - fixtures
    ANSWER,
    STREAMING,
    chromium_executable,
    no_page_errors,
    open_page,
    screenshot,
    send,
    wait_answer,
    wait_connected,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration]

AUTH_FAILED = "The model server refused Chorus's API key."


def wait_idle(page) -> None:
    wait_until(page, "() => document.getElementById('connection-status').textContent.trim() !== 'Answering…'"
               " && document.getElementById('stop-button').hidden", what="the run to end")  # fmt: skip


def test_a_failed_turn_says_why_on_the_turn_after_a_reload_and_edit_fixes_it(conversation, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    send(page, "This will fail [[fault:401]]")
    wait_until(page, "() => document.querySelector('li.run .turn-error')", what="the error on the failed turn")
    error = page.locator("li.run .turn-error")
    assert error.text_content().strip() == AUTH_FAILED
    assert page.locator("#run-error").is_hidden(), "no page-wide box: the reason is on its turn"
    assert page.locator("li.run .run-actions .regenerate").text_content().strip() == "Retry"
    screenshot(page, "page-turn-failed")

    page.reload()
    wait_connected(page)
    assert page.locator("li.run .turn-error").text_content().strip() == AUTH_FAILED, "kept after a reload"
    assert page.locator("li.run .regenerate").is_visible()

    # Retry sends the same words again: the failed turn is replaced (one turn on the page, not two).
    old_run = page.locator("li.run").get_attribute("data-run-id")
    page.locator("li.run .regenerate").click()
    retried = "(old) => document.querySelector('li.run')?.dataset.runId !== old"
    retried += " && document.querySelector('.turn-error')"
    wait_until(page, retried, arg=old_run, what="the retried turn's error")
    assert page.locator("li.message.user").count() == 1 and page.locator("li.run").count() == 1

    # Edit the message (no fault this time): the answer comes, the failure is gone for good.
    page.locator("li.message.user .edit-message").click()
    editor = page.locator("li.message.user .message-editor textarea")
    assert editor.input_value() == "This will fail [[fault:401]]"
    editor.fill("This works now [[reply:Fixed **answer**.]]")
    editor.press("Enter")
    wait_answer(page)
    assert page.locator(ANSWER).inner_text().strip() == "Fixed answer."
    assert page.locator("li.message.user").count() == 1
    assert (
        page.locator("li.message.user .content").text_content().strip() == "This works now [[reply:Fixed **answer**.]]"
    )
    assert page.locator(".turn-error").count() == 0
    screenshot(page, "page-turn-edited")

    page.reload()
    wait_connected(page)
    assert page.locator("li.message.user").count() == 1 and page.locator(".turn-error").count() == 0
    assert page.locator(ANSWER).inner_text().strip() == "Fixed answer."
    no_page_errors(console)


def test_a_message_typed_while_the_team_answers_is_kept_and_enter_sends_it_after(conversation, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    send(page, "[[tokens:80]] [[tps:20]]")
    wait_until(page, f"() => document.querySelector('{STREAMING}')?.textContent.length > 0", what="streaming")
    # Screen readers hear the answer as it grows: a polite live region, busy while the message streams.
    assert page.locator("li.run .answers").get_attribute("aria-live") == "polite"
    assert page.locator("li.message.assistant.streaming").get_attribute("aria-busy") == "true"
    page.locator("#composer-input").fill("And a follow-up [[reply:Second.]]")
    page.locator("#composer-input").press("Enter")
    assert page.locator("#composer-input").input_value() == "And a follow-up [[reply:Second.]]", "never cleared"
    assert page.locator("#composer-note").is_visible()
    assert page.locator("#run-error").is_hidden(), "nothing was refused: nothing was sent"
    screenshot(page, "page-typed-while-answering")

    wait_answer(page)
    assert page.locator("#composer-note").is_hidden()
    page.locator("#composer-input").press("Enter")  # as the Send button does
    wait_answer(page, 2)
    assert page.locator(ANSWER).nth(1).inner_text().strip() == "Second."
    assert page.locator("#composer-input").input_value() == ""
    no_page_errors(console)


def test_esc_stops_the_answer(conversation, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)
    send(page, "[[tokens:400]] [[tps:20]]")
    wait_until(page, f"() => document.querySelector('{STREAMING}')?.textContent.length > 0", what="streaming")
    page.keyboard.press("Escape")
    wait_until(page, "() => document.querySelector('li.run .turn-error')", what="the stopped turn")
    assert page.locator("li.run").get_attribute("data-status") == "cancelled"
    assert page.locator("li.run .regenerate").text_content().strip() == "Retry"
    no_page_errors(console)


def test_regenerate_replaces_the_last_answer_and_copy_buttons_copy(conversation, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    send(page, "[[reply:Here is code:\n\n```python\nprint('hi')\n```\n]]")
    wait_answer(page)
    first_answer_id = page.locator("li.run .answers > li.message").get_attribute("data-message-id")

    page.locator("li.run .answers .code-block .copy-code").click()
    wait_until(page, "() => navigator.clipboard.readText().then(t => t === \"print('hi')\\n\")",
               what="the code block in the clipboard")  # fmt: skip
    page.locator("li.message.user .copy-message").click()
    wait_until(page, "() => navigator.clipboard.readText().then(t => t.startsWith('[[reply:Here is code'))",
               what="the person's message, as typed, in the clipboard")  # fmt: skip

    page.locator("li.run .regenerate").click()
    wait_until(page, "(old) => { const a = document.querySelector('li.run .answers > li.message:not(.streaming)');"
               " return a && a.dataset.messageId !== old && document.getElementById('stop-button').hidden; }",
               arg=first_answer_id, what="a new answer in place of the old one")  # fmt: skip
    assert page.locator("li.run").count() == 1 and page.locator("li.message.user").count() == 1
    screenshot(page, "page-regenerated")
    page.reload()
    wait_connected(page)
    assert page.locator("li.run").count() == 1 and page.locator("li.message.user").count() == 1
    assert page.locator("li.run .answers > li.message").get_attribute("data-message-id") != first_answer_id
    no_page_errors(console)


STEPS_AND_ANSWER = """() => [...document.querySelectorAll('li.run .step-list > li, li.run .answers > li')].map(li =>
    [li.dataset.messageId, li.className, li.querySelector('.source').textContent.trim(),
     li.querySelector('.content').textContent.trim()])"""


def test_a_writer_critic_runs_steps_are_in_the_same_order_live_and_after_a_reload(owner, team, cookie, open_page):  # noqa: F811
    from agents_app.models import Team

    writer_critic = Team.objects.get(slug="writer-critic")
    conversation = services.conversation_create(owner=owner, team=writer_critic)
    page, console = open_page(cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)
    send(page, "Write a haiku about rain. [[critic>reply:Shorter, please.]]")
    wait_answer(page)
    wait_idle(page)
    live = page.evaluate(STEPS_AND_ANSWER)
    sources = [step[2] for step in live]
    # Steps: the first draft before its critique, then the second critique; the answer: the revision.
    assert sources == ["writer", "critic", "critic", "writer"], sources

    page.reload()
    wait_connected(page)
    assert page.evaluate(STEPS_AND_ANSWER) == live
    no_page_errors(console)
