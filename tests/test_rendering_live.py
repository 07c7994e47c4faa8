"""Rendering in a real headless Chromium: Markdown formatted while the answer streams, maths typeset with
KaTeX, code colours in light and dark, the person's whitespace kept, all under the strict Content-Security-Policy.

The stack is test_browser.py's (real daphne, worker, Redis and database); its model server here runs with
--demo-roles, as `make run` starts it. Screenshots go where CHORUS_BROWSER_SCREENSHOTS says, as there.
"""

import os

import pytest

from agents_app.domain import services
from tests import test_browser
from tests.support import Process, free_port, python_args, session_cookie, wait_for_port
from tests.test_browser import (
    ANSWER,
    screenshot,
    send,
    wait_answer,
    wait_connected,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration]

STREAMING = "li.message.assistant.streaming .content"
# The answer: formatting first, then a tail that keeps it streaming while the test looks (10 tokens a second).
REPLY = (
    "**Bold** start, `inline` code.\n\n> A quote.\n\n| Name | Value |\n| --- | ---: |\n| alpha | 1 |\n\n"
    "```python\ndef area(r):\n    return 3.14 * r ** 2  # note\n```\n\n"
    "Pythagoras: $a^2 + b^2 = c^2$, and $5 or $10 stays text.\n\n$$\\int_0^1 x\\,dx = \\frac{1}{2}$$\n\n"
    + " ".join(["tail"] * 40)
)


@pytest.fixture(scope="module")
def fakellm_url(tmp_path_factory):
    """The offline model server as `make run` starts it (--demo-roles), at 200 tokens/s unless asked otherwise."""
    port = free_port()
    args = python_args("-m", "fakellm", "--port", str(port), "--tps", "200", "--demo-roles")
    process = Process("fakellm-demo", args, dict(os.environ), tmp_path_factory.mktemp("fakellm-demo"))
    wait_for_port(port, process=process)
    yield f"http://127.0.0.1:{port}/v1"
    process.stop()


# test_browser's fixtures: Chromium, and a page on the stack.
chromium_executable = test_browser.chromium_executable
open_page = test_browser.open_page


@pytest.fixture
def logged_in_cookie(owner):
    return session_cookie(owner)


@pytest.fixture
def conversation(owner, team):
    return services.conversation_create(owner=owner, team=team)


def assert_clean(console) -> None:
    """No uncaught error, no console error, no Content-Security-Policy violation (KaTeX's fonts included)."""
    assert console.errors == [], "\n".join(console.errors + console.messages)
    assert [m for m in console.messages if m.startswith("error:")] == [], "\n".join(console.messages)
    assert console.csp_violations() == [], console.csp_violations()


def colours(page) -> dict:
    """Computed colours of a keyword, a comment and the paragraph text of the finished answer."""
    return page.evaluate(
        """(answer) => {
             const root = document.querySelector(answer);
             const colour = (sel) => getComputedStyle(root.querySelector(sel)).color;
             return {keyword: colour('.highlight .k'), comment: colour('.highlight .c1'), text: colour('p'),
                     block: getComputedStyle(root.querySelector('.highlight')).backgroundColor};
           }""",
        ANSWER,
    )


def test_a_streamed_answer_is_formatted_before_it_completes_then_the_servers_html_keeps_it(
    conversation, logged_in_cookie, open_page
):
    page, console = open_page(logged_in_cookie)
    response = page.goto(f"/conversations/{conversation.id}/")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "style-src 'self'" in policy and "unsafe-inline" not in policy
    wait_connected(page)

    send(page, f"[[reply:{REPLY}]] [[tps:10]]")
    # While the message still streams: bold, a table, a code block and typeset maths are already there.
    wait_until(
        page,
        """(sel) => { const el = document.querySelector(sel);
                     return el && el.querySelector('strong') && el.querySelector('table td')
                       && el.querySelector('.highlight pre code') && el.querySelectorAll('.katex').length === 2; }""",
        arg=STREAMING,
        what="bold, a table, a code block and two formulas in the message while it streams",
    )
    streaming = page.locator(STREAMING)
    assert streaming.locator("strong").first.text_content() == "Bold"
    assert streaming.locator("table td").first.text_content() == "alpha"
    assert streaming.locator(".highlight .filename").text_content() == "python"
    assert "**Bold" not in streaming.text_content() and "| ---" not in streaming.text_content()
    assert "$5 or $10 stays text" in streaming.text_content()
    assert streaming.locator(".math-display .katex-display").count() == 1
    screenshot(page, "rendering-streaming")

    wait_answer(page)
    answer = page.locator(ANSWER)
    # The server's HTML: Pygments' token classes, the label, the same table, maths typeset again.
    assert answer.locator(".highlight .k").first.text_content() == "def"
    assert answer.locator(".highlight .filename").text_content() == "python"
    assert answer.locator("table td").first.text_content() == "alpha"
    wait_until(page, "(sel) => document.querySelectorAll(sel + ' .katex').length === 2", arg=ANSWER,
               what="KaTeX to typeset the two formulas of the server's HTML")  # fmt: skip
    assert answer.locator(".math-inline .katex-mathml annotation").first.text_content() == "a^2 + b^2 = c^2"
    assert "$5 or $10 stays text" in answer.text_content()
    screenshot(page, "rendering-answered-light")

    # Inline code is padded, a code block's code is not (its first line starts where the others do); tables
    # have borders, quotes a bar.
    looks = page.evaluate(
        """(answer) => {
             const root = document.querySelector(answer);
             const style = (sel) => getComputedStyle(root.querySelector(sel));
             return {inline: style('p > code').paddingLeft, block: style('.highlight pre code').paddingLeft,
                     cell: style('td').borderTopWidth, quote: style('blockquote').borderLeftWidth,
                     align: style('td[align="right"]').textAlign};
           }""",
        ANSWER,
    )
    assert looks["block"] == "0px" and looks["inline"] != "0px", looks
    assert looks["cell"] != "0px" and looks["quote"] != "0px" and looks["align"] == "right", looks

    # Colours: the keyword and the comment differ from plain text and from each other.
    light = colours(page)
    assert len({light["keyword"], light["comment"], light["text"]}) == 3, light
    # The page's theme toggle sets data-theme on <html>: the dark colours follow.
    page.evaluate("() => { document.documentElement.dataset.theme = 'dark'; }")
    dark = colours(page)
    assert dark["keyword"] != light["keyword"] and dark["block"] != light["block"], (light, dark)
    assert len({dark["keyword"], dark["comment"], dark["text"]}) == 3, dark
    screenshot(page, "rendering-answered-dark")
    # Or the system's preference, unless the toggle chose light.
    page.evaluate("() => { delete document.documentElement.dataset.theme; }")
    page.emulate_media(color_scheme="dark")
    assert colours(page)["keyword"] == dark["keyword"]
    page.evaluate("() => { document.documentElement.dataset.theme = 'light'; }")
    assert colours(page)["keyword"] == light["keyword"]
    page.emulate_media(color_scheme="light")

    # On a phone, wide tables, code and formulas scroll inside the message: the page itself never scrolls sideways.
    page.set_viewport_size({"width": 360, "height": 760})
    page.evaluate("() => { document.documentElement.dataset.theme = 'dark'; }")
    wide = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert wide <= 0, f"the page scrolls sideways by {wide} px at 360 px"
    page.wait_for_timeout(500)  # only for the picture: the sidebar's slide-out after the resize
    screenshot(page, "rendering-phone-dark")
    page.evaluate("() => { delete document.documentElement.dataset.theme; }")
    page.set_viewport_size({"width": 1000, "height": 760})

    # After a reload, the history is the server's HTML and its maths is typeset on load.
    page.reload()
    wait_connected(page)
    wait_until(page, "(sel) => document.querySelectorAll(sel + ' .katex').length === 2", arg=ANSWER,
               what="the formulas of the history typeset")  # fmt: skip
    assert page.locator(f"{ANSWER} .highlight .filename").text_content() == "python"
    assert_clean(console)


def test_the_renderer_shows_an_unclosed_fence_as_code_and_keeps_the_servers_allow_list(conversation, logged_in_cookie,
                                                                                         open_page):  # fmt: skip
    page, console = open_page(logged_in_cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)
    rendered = page.evaluate(
        """() => ({
             open: ChorusMarkdown.render('Here:\\n\\n```js\\nlet a = 1;\\nlet b'),
             hostile: ChorusMarkdown.render('<img src=x onerror=alert(1)> <b class="banner">b</b> [x](javascript:a())'),
             bare: ChorusMarkdown.render('a <strong>b</strong><br>c <script>'),
             escaped: ChorusMarkdown.render('costs \\\\$5, and `$x$` is code'),
           })"""
    )
    assert rendered["open"].endswith(
        '<span class="filename">js</span><pre><code>let a = 1;\nlet b</code></pre></div>\n'
    )
    # Raw HTML with attributes, or a tag off the allow-list, stays text until the server's sanitised HTML comes:
    # no image, no handler, no class, no javascript: link reaches the page, not even DOMPurify's parser.
    assert rendered["hostile"] == (
        '<p>&lt;img src=x onerror=alert(1)&gt; &lt;b class="banner"&gt;b&lt;/b&gt; [x](javascript:a())</p>\n'
    )
    assert rendered["bare"] == "<p>a <strong>b</strong><br>c &lt;script&gt;</p>\n"
    assert rendered["escaped"] == "<p>costs $5, and <code>$x$</code> is code</p>\n"
    assert_clean(console)


def test_the_persons_message_keeps_its_indentation_and_double_spaces(conversation, logged_in_cookie, open_page):
    page, console = open_page(logged_in_cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    question = "def f():\n    return  2*3  # two  spaces"
    page.locator("#composer-input").fill(question)
    page.locator("#send-button").click()
    wait_answer(page)
    user = page.locator("li.message.user .content")
    assert user.evaluate("(el) => getComputedStyle(el).whiteSpace") == "pre-wrap"
    assert user.inner_text() == question, "shown as typed: indentation, double spaces and asterisks"
    screenshot(page, "rendering-user-whitespace")
    assert_clean(console)


def test_the_demo_teams_show_their_character_in_the_page(owner, team, logged_in_cookie, open_page):
    """The research desk, offline and with no directive: the analyst's tool call with the question's expression
    and its result are in the steps, the reporter's answer has the result."""
    from agents_app.models import Team

    desk = services.conversation_create(owner=owner, team=Team.objects.get(slug="research-desk"))
    page, console = open_page(logged_in_cookie)
    page.goto(f"/conversations/{desk.id}/")
    wait_connected(page)

    send(page, "What is 17*23?")
    wait_answer(page)
    page.locator("li.run details.steps > summary").click()
    steps = page.locator("li.run .step-list").text_content()
    assert "compute 17*23 with the calculator" in steps, steps
    assert 'calculator({"expression": "17*23"})' in steps and "391" in steps
    assert "391" in page.locator("li.run .answers > li.message .content").text_content()
    screenshot(page, "demo-research-desk")
    assert_clean(console)


def test_the_automatic_router_says_why_and_the_critic_approves_in_the_page(owner, team, logged_in_cookie, open_page):
    from agents_app.models import Team

    routed = services.conversation_create(owner=owner, team=Team.objects.get(slug="automatic"))
    page, console = open_page(logged_in_cookie)
    page.goto(f"/conversations/{routed.id}/")
    wait_connected(page)

    send(page, "Hello there")  # no keyword rule: the model picks, and says why
    wait_answer(page)
    header = page.locator("li.run .run-header").last.text_content()
    assert "the model chose it: assistant:" in header and "so the first one answers" in header, header

    send(page, "Write a haiku about rain")  # a keyword rule: the writer and the critic
    wait_answer(page, 2)
    page.locator("li.run details.steps > summary").last.click()
    steps = page.locator("li.run").last.locator(".step-list > li")
    said = [(s.locator(".source").text_content().strip(), s.locator(".content").text_content().strip())
            for s in steps.all()]  # fmt: skip
    assert [source for source, _ in said] == ["writer", "critic", "critic"], said
    assert "Two points on this draft" in said[1][1] and said[2][1] == "APPROVED"
    answer = page.locator("li.run").last.locator(".answers > li.message .content").text_content()
    assert "revised after the critic's two points" in answer
    screenshot(page, "demo-router-writer-critic")
    assert_clean(console)
