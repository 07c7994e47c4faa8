"""The sidebar and conversation management in a real Chromium: newest first, more as it scrolls, search over
titles and message text, rename in place, delete after a confirmation; a new conversation is stored only when
its first message is sent, and its title appears live; the page opens at the latest message, ready to type."""

import pytest

from agents_app.domain import services
from agents_app.models import Conversation, Message
from tests.test_browser import (  # noqa: F401 - fixtures
    chromium_executable,
    open_page,
    screenshot,
    send,
    wait_answer,
    wait_connected,
    wait_for_path,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ROWS = "#conversation-list > li.conversation"
COUNT_STORED = "() => fetch('/api/conversations/?limit=200').then(r => r.json()).then(list => list.length)"


def say(conversation, content, role="user"):
    seq = services.seq_reserve(conversation_id=conversation.id)
    Message.objects.create(conversation=conversation, role=role, source=role, content=content, seq=seq,
                           is_final_answer=role != "user")  # fmt: skip
    Conversation.objects.filter(id=conversation.id).update(last_seq=seq)


@pytest.fixture
def many(owner, team):
    """45 conversations, "Trip 00" the oldest and "Trip 44" the newest; "Trip 07" mentions a zebra."""
    made = []
    for i in range(45):
        conversation = services.conversation_create(owner=owner, team=team, title=f"Trip {i:02d}")
        if i == 7:
            say(conversation, "Did we see a zebra crossing?")
        made.append(conversation)
    return made


def titles(page) -> list[str]:
    return page.locator(f"{ROWS} .conversation-title").all_text_contents()


def test_the_list_pages_as_it_scrolls_and_searches_titles_and_words(many, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    page.goto("/")
    wait_until(page, f"() => document.querySelectorAll('{ROWS}').length >= 30", what="the first page of the list")
    assert titles(page)[:3] == ["Trip 44", "Trip 43", "Trip 42"], "most recently active first"
    assert len(titles(page)) < 45, "one page at a time"
    screenshot(page, "page-sidebar")

    page.locator("#conversation-list-end").scroll_into_view_if_needed()
    wait_until(page, f"() => document.querySelectorAll('{ROWS}').length === 45", what="the rest as the list scrolls")
    assert titles(page)[-1] == "Trip 00" and len(set(titles(page))) == 45, "no row twice"

    page.locator("body").click()
    page.keyboard.press("/")
    assert page.evaluate("() => document.activeElement.id") == "conversation-search"
    page.keyboard.type("zebra")
    wait_until(page, f"() => document.querySelectorAll('{ROWS}').length === 1", what="the search by message text")
    assert titles(page) == ["Trip 07"]
    page.locator("#conversation-search").fill("no such thing")
    wait_until(page, "() => document.getElementById('conversation-list-status').textContent === 'Nothing matches.'",
               what="an empty search")  # fmt: skip
    assert console.errors == [] and console.csp_violations() == []


def test_a_conversation_is_renamed_in_place_and_deleted_after_a_confirmation(many, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    current = many[44]
    page.goto(f"/conversations/{current.id}/")
    wait_connected(page)
    wait_until(page, f"() => document.querySelectorAll('{ROWS}').length >= 30", what="the list")

    row = page.locator(f"{ROWS}[data-id='{current.id}']")
    row.locator(".rename").click()
    field = row.locator(".rename-field")
    field.fill("Lisbon in May")
    field.press("Enter")
    wait_until(page, "() => document.getElementById('conversation-title').textContent === 'Lisbon in May'",
               what="the new title in the page's header, from the socket's conversation.updated")  # fmt: skip
    assert row.locator(".conversation-title").text_content() == "Lisbon in May"
    assert page.title().startswith("Lisbon in May")

    other = page.locator(f"{ROWS}[data-id='{many[43].id}']")
    other.locator(".delete").click()
    assert other.locator(".confirm-delete").is_visible()
    screenshot(page, "page-sidebar-confirm-delete")
    other.locator(".confirm-delete .cancel").click()
    assert other.locator(".confirm-delete").count() == 0 and other.is_visible(), "Cancel keeps it"
    other.locator(".delete").click()
    other.locator(".confirm-delete .confirm").click()
    wait_until(page, "(id) => !document.querySelector(`#conversation-list li[data-id='${id}']`)", arg=str(many[43].id),
               what="the deleted row to go")  # fmt: skip
    assert page.evaluate(COUNT_STORED) == 44

    page.reload()
    wait_connected(page)
    wait_until(page, f"() => document.querySelectorAll('{ROWS}').length >= 30", what="the list after a reload")
    assert titles(page)[:2] == ["Lisbon in May", "Trip 42"], "renamed (its place kept), and the deleted one gone"

    # Deleting the conversation on screen leads to a new one.
    row = page.locator(f"{ROWS}[data-id='{current.id}']")
    row.locator(".delete").click()
    row.locator(".confirm-delete .confirm").click()
    wait_for_path(page, "/", "a new conversation once the open one is deleted")
    assert console.errors == [] and console.csp_violations() == []


def test_new_conversation_is_stored_with_its_first_message_and_named_live(owner, team, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    page.goto("/")
    assert page.evaluate("() => document.activeElement.id") == "composer-input", "ready to type"
    page.locator("#new-conversation").click()
    page.locator("#new-conversation").click()
    assert page.evaluate(COUNT_STORED) == 0, "opening new conversations stores nothing"
    assert page.locator("#conversation-list-status").text_content() == "No conversations yet."

    send(page, "Plan a picnic [[reply:Bring bread.]]")
    wait_for_path(page, "/conversations/[0-9a-f-]+/", "the conversation's address after its first message")
    wait_answer(page)
    wait_until(page, "() => document.getElementById('conversation-title').textContent.startsWith('Plan a picnic')",
               what="the title, live")  # fmt: skip
    assert titles(page) == ["Plan a picnic [[reply:Bring bread.]]"]
    assert page.locator(f"{ROWS} [aria-current='page']").count() == 1
    assert page.evaluate(COUNT_STORED) == 1
    screenshot(page, "page-new-conversation-named")
    assert console.errors == [] and console.csp_violations() == []


@pytest.fixture
def long_conversation(owner, team):
    conversation = services.conversation_create(owner=owner, team=team, title="Long")
    for i in range(30):
        say(conversation, f"Question {i}", role="user")
        say(conversation, f"Answer {i}\n\n" + "A long paragraph. " * 30, role="assistant")
    return conversation


def test_the_page_opens_at_the_latest_message_with_the_composer_focused(long_conversation, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    page.goto(f"/conversations/{long_conversation.id}/")
    wait_connected(page)
    wait_until(page, "() => window.scrollY + window.innerHeight >= document.body.scrollHeight - 4",
               what="the window scrolled to the latest message")  # fmt: skip
    assert page.locator("li.message").last.is_visible()
    assert page.evaluate("() => document.activeElement.id") == "composer-input"
    assert console.errors == [] and console.csp_violations() == []
