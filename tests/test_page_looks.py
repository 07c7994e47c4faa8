"""The chat page at desktop and phone widths (390 and 360 px), light and dark, in a real Chromium: no sideways
scroll, the sidebar slides in on phones, the theme follows the system or the toggle, the offline notice can be
dismissed; and the answer's thumbs and the conversation's share link work from the page."""

import pytest

from agents_app.domain import services
from agents_app.models import Conversation, Message
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

ANSWER_TEXT = """Here is a plan with a `code` word, a table and code:

| Day | Where | What we do there, described at some length |
| --- | --- | --- |
| Monday | Lisbon | A very long cell that should wrap or scroll inside its table, never the page |

```python
print("a long line of code that is much wider than any phone screen can show at once, scrolled in its block")
```
"""

NO_SIDEWAYS_SCROLL = "() => document.documentElement.scrollWidth <= window.innerWidth"
BACKGROUND = "() => getComputedStyle(document.body).backgroundColor"


@pytest.fixture
def planned(owner, team):
    conversation = services.conversation_create(
        owner=owner, team=team, title="A rather long conversation title that would wrap word by word on a phone"
    )
    for role, content in (("user", "Plan my week, please, with a table and some code."), ("assistant", ANSWER_TEXT)):
        seq = services.seq_reserve(conversation_id=conversation.id)
        Message.objects.create(conversation=conversation, role=role, source=role, content=content, seq=seq,
                               is_final_answer=role == "assistant")  # fmt: skip
        Conversation.objects.filter(id=conversation.id).update(last_seq=seq)
    return conversation


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("width", [1000, 390, 360])
def test_the_page_fits_every_width_in_both_themes(planned, cookie, open_page, width, scheme):  # noqa: F811
    page, console = open_page(cookie)
    page.set_viewport_size({"width": width, "height": 800})
    page.emulate_media(color_scheme=scheme)
    page.goto(f"/conversations/{planned.id}/")
    wait_connected(page)
    wait_until(page, "() => document.querySelectorAll('#conversation-list li').length === 1", what="the list")

    assert page.evaluate(NO_SIDEWAYS_SCROLL), f"sideways scroll at {width} px"
    dark = page.evaluate(BACKGROUND) == "rgb(18, 21, 27)"
    assert dark == (scheme == "dark"), page.evaluate(BACKGROUND)
    banner = page.locator("#offline-model-banner")
    assert banner.bounding_box()["height"] < 100, "the offline notice stays a strip"
    screenshot(page, f"page-chat-{width}-{scheme}")

    sidebar = page.locator("#sidebar")
    if width < 800:
        assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0, "folded away on a phone"
        page.locator("#sidebar-toggle").click()
        wait_until(page, "() => document.getElementById('sidebar').getBoundingClientRect().left >= 0",
                   what="the sidebar to slide in")  # fmt: skip
        screenshot(page, f"page-sidebar-{width}-{scheme}")
        page.mouse.click(width - 8, 500)  # on the dimmed page beside it
        wait_until(page, "() => document.getElementById('sidebar').getBoundingClientRect().right <= 0",
                   what="the sidebar to slide away")  # fmt: skip
        page.locator("#sidebar-toggle").click()
        page.locator("#sidebar-close").click()
        assert not page.evaluate("() => document.body.classList.contains('sidebar-open')")
    else:
        assert sidebar.is_visible() and sidebar.bounding_box()["x"] == 0
    assert page.evaluate(NO_SIDEWAYS_SCROLL)
    assert console.errors == [] and console.csp_violations() == []


def test_the_theme_toggle_wins_over_the_system_and_the_offline_notice_can_be_dismissed(planned, cookie, open_page):  # noqa: F811
    page, console = open_page(cookie)
    page.emulate_media(color_scheme="light")
    page.goto(f"/conversations/{planned.id}/")
    wait_connected(page)
    assert page.evaluate(BACKGROUND) != "rgb(18, 21, 27)"
    page.locator("#theme-toggle").click()
    assert page.evaluate(BACKGROUND) == "rgb(18, 21, 27)"
    assert page.locator("#theme-toggle").get_attribute("aria-pressed") == "true"
    page.locator("#offline-model-dismiss").click()
    assert page.locator("#offline-model-banner").is_hidden()

    page.reload()
    wait_connected(page)
    assert page.evaluate(BACKGROUND) == "rgb(18, 21, 27)", "the pick is remembered"
    assert page.locator("#offline-model-banner").is_hidden(), "dismissed for good"
    page.locator("#theme-toggle").click()
    assert page.evaluate(BACKGROUND) != "rgb(18, 21, 27)"
    assert console.errors == [] and console.csp_violations() == []


def test_thumbs_and_a_comment_are_kept_and_a_share_link_reads_without_login(owner, team, cookie, open_page):  # noqa: F811
    conversation = services.conversation_create(owner=owner, team=team)
    page, console = open_page(cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)
    send(page, "[[reply:A *shared* answer.]]")
    wait_answer(page)

    answer = page.locator("li.run .answers > li.message")
    answer.locator(".feedback[data-rating='-1']").click()
    wait_until(page, "() => document.querySelector('.feedback-form')", what="the comment box")
    assert answer.locator(".feedback[data-rating='-1']").get_attribute("aria-pressed") == "true"
    answer.locator(".feedback-form textarea").fill("Too short")
    answer.locator(".feedback-form button[type=submit]").click()
    wait_until(page, "() => document.querySelector('.feedback-thanks')", what="the thanks")
    screenshot(page, "page-feedback")
    page.reload()
    wait_connected(page)
    assert answer.locator(".feedback[data-rating='-1']").get_attribute("aria-pressed") == "true", "kept"
    assert answer.locator(".feedback[data-rating='1']").get_attribute("aria-pressed") == "false"

    page.locator("#share-button").click()
    page.locator("#share-create").click()
    wait_until(page, "() => document.querySelector('#share-links .share-url')", what="the new link")
    url = page.locator("#share-links .share-url").input_value()
    screenshot(page, "page-share-panel")

    reader, reader_console = open_page()  # no login
    reader.goto(url)
    assert reader.locator("li.message.assistant .content").inner_text().strip() == "A shared answer."
    assert reader.locator("#composer, #sidebar, .feedback, .regenerate").count() == 0, "read-only"
    assert reader.evaluate("() => typeof WebSocket !== 'undefined' && !window.chorusConnected")
    screenshot(reader, "page-shared-read-only")

    page.locator("#share-links .revoke-link").click()
    wait_until(page, "() => !document.querySelector('#share-links li')", what="the revoked link to go")
    assert reader.goto(url).status == 404, "a revoked link opens nothing"
    assert console.errors == [] and console.csp_violations() == []
    assert reader_console.errors == [] and reader_console.csp_violations() == []
