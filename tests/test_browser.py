"""The chat page in a real headless Chromium, talking to real daphne and an agent worker over a real WebSocket.

Playwright drives Debian's `chromium` (`playwright install` cannot download browsers here). Playwright's
sync API keeps an asyncio loop running in this thread, where Django refuses ORM calls, so every database
row a test needs is made by fixtures that pytest sets up before the browser starts.
"""

import io
import os
import re
import shutil
from urllib.parse import urlsplit

import pytest
from PIL import Image

from agents_app.domain import services
from agents_app.models import Team
from tests.support import session_cookie

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 20_000  # generous: a noisy 2-core machine runs daphne, a worker, the model server and Chromium
SCREENSHOTS = os.environ.get("CHORUS_BROWSER_SCREENSHOTS", "")  # a folder to save screenshots in, if set

STREAMING = "li.message.assistant.streaming .content"
ANSWER = "li.message.assistant:not(.streaming) .content"


@pytest.fixture(scope="session", autouse=True)
def chromium_executable() -> str:
    """Debian's Chromium, looked up before anything starts: skipped without it, or failed where CI is set."""
    path = shutil.which("chromium")
    if path is None:
        reason = "install Debian's chromium to run the browser tests (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but Chromium is missing: {reason}", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture
def open_page(stack, chromium_executable):
    """Opens a page in a headless Chromium on the stack's web server: `open_page(cookie=None) -> (page, console)`.

    The browser starts on the first call, in the test body, so every fixture has made its rows before
    Playwright's loop runs in this thread; it stops when the test ends, before the stack does. (`stack`
    must stay a static dependency: it brings `transactional_db`, so the rows are committed where the
    server processes can read them.)
    """
    from playwright.sync_api import sync_playwright

    base_url = f"http://127.0.0.1:{stack.web_port}"
    started = {}

    def open_(cookie: str | None = None):
        if not started:
            started["playwright"] = sync_playwright().start()
            started["browser"] = started["playwright"].chromium.launch(
                executable_path=chromium_executable, args=CHROMIUM_ARGS
            )
        context = started["browser"].new_context(base_url=base_url, viewport={"width": 1000, "height": 760})
        context.set_default_timeout(TIMEOUT_MS)
        if cookie:
            context.add_cookies([{"name": "sessionid", "value": cookie, "url": base_url}])
        page = context.new_page()
        console = Console(page)
        page._chorus_console, page._chorus_stack = console, stack  # for page_state() when a wait fails
        return page, console

    yield open_
    if started:
        started["browser"].close()
        started["playwright"].stop()


class Console:
    """What the page logged: console messages and uncaught errors."""

    def __init__(self, page):
        self.messages: list[str] = []
        self.errors: list[str] = []
        page.on("console", lambda m: self.messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def csp_violations(self) -> list[str]:
        return [m for m in self.messages if "Content Security Policy" in m]


def no_page_errors(console) -> None:
    assert console.errors == [], f"uncaught errors in the page: {console.errors}"
    assert console.csp_violations() == [], console.csp_violations()


def wait_until(page, condition: str, arg=None, what: str = "the condition"):
    """`page.wait_for_function`, failing with what the page showed, said and what the processes logged."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        return page.wait_for_function(condition, arg=arg, timeout=TIMEOUT_MS)
    except PlaywrightTimeout:
        pytest.fail(f"waited {TIMEOUT_MS} ms for {what}\n{page_state(page)}", pytrace=False)


def wait_for_path(page, pattern: str, what: str) -> None:
    """Until the page has navigated to a URL whose path matches `pattern` (a regular expression)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_url(lambda url: re.fullmatch(pattern, urlsplit(url).path) is not None, timeout=TIMEOUT_MS)
    except PlaywrightTimeout:
        pytest.fail(f"waited {TIMEOUT_MS} ms for {what}\n{page_state(page)}", pytrace=False)


def page_state(page) -> str:
    """The status, the error line and the messages of the chat page, the console, and the processes' logs."""
    state = page.evaluate(
        """() => ({
             url: location.href,
             text: document.querySelector('main')?.innerText.slice(0, 500),
             status: document.getElementById('connection-status')?.textContent,
             error: document.getElementById('run-error')?.textContent,
             messages: [...document.querySelectorAll('#messages li')].map(li => li.className + ': '
                 + li.querySelector('.content')?.innerHTML.slice(0, 300)),
           })"""
    )
    console = getattr(page, "_chorus_console", None)
    stack = getattr(page, "_chorus_stack", None)
    return "\n".join(
        [
            f"page: {state}",
            f"console: {console.messages + console.errors if console else '?'}",
            stack.logs_text() if stack else "",
        ]
    )


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=os.path.join(SCREENSHOTS, f"{name}.png"), full_page=True)


def wait_connected(page) -> None:
    wait_until(
        page,
        "() => document.getElementById('connection-status').textContent.trim() === 'Connected'",
        what="the connection status to say Connected",
    )


def wait_answer(page, count: int = 1) -> None:
    """Until `count` assistant answers are complete (rendered by the server) and the run has finished."""
    wait_until(
        page,
        """(count) => document.querySelectorAll('li.message.assistant:not(.streaming)').length >= count
                      && document.getElementById('connection-status').textContent.trim() === 'Connected'""",
        arg=count,
        what=f"{count} finished answer(s)",
    )


def send(page, text: str) -> None:
    page.locator("#composer-input").fill(text)
    page.locator("#composer-input").press("Enter")


def assert_no_error_shown(page, console: Console) -> None:
    assert page.locator("#run-error").is_hidden(), page.locator("#run-error").text_content()
    assert console.errors == [], f"uncaught errors in the page: {console.errors}"
    assert console.csp_violations() == [], f"Content-Security-Policy violations: {console.csp_violations()}"


@pytest.fixture
def logged_in_cookie(owner):
    return session_cookie(owner)


@pytest.fixture
def conversation(owner, team):
    return services.conversation_create(owner=owner, team=team)


def test_log_in_start_a_conversation_and_watch_the_answer_stream_in(owner, team, open_page):
    page, console = open_page()

    page.goto("/accounts/login/")
    screenshot(page, "login")
    page.locator("#id_username").fill("owner")
    page.locator("#id_password").fill("owner-password-1")
    page.get_by_role("button", name="Log in").click()
    wait_for_path(page, "/", "the conversation list, once logged in")
    screenshot(page, "conversation-list")
    page.locator("#new-conversation").click()
    wait_for_path(page, "/", "a new conversation, not stored until its first message")

    question = "Count for me, slowly [[tokens:60]] [[tps:20]]"
    expected = " ".join(f"tok{i}" for i in range(1, 61))
    send(page, question)
    assert page.locator("#composer-input").input_value() == "", "the composer is cleared once the message is sent"
    wait_for_path(page, "/conversations/[0-9a-f-]+/", "the conversation's own address once its first message is sent")

    # While the model writes (60 tokens at 20 per second: about 3 s), the streaming message keeps growing.
    lengths: list[int] = []
    for _ in range(3):
        grown = wait_until(
            page,
            """([selector, previous]) => {
                 const el = document.querySelector(selector);
                 return el && el.textContent.length > previous ? el.textContent.length : false;
               }""",
            arg=[STREAMING, lengths[-1] if lengths else 0],
            what=f"the streaming answer to grow past its sampled lengths {lengths}",
        )
        lengths.append(grown.json_value())
        if len(lengths) == 2:
            screenshot(page, "chat-streaming")
    assert lengths == sorted(set(lengths)), f"the streaming text grew each time it was sampled: {lengths}"
    assert lengths[-1] < len(expected), f"the samples were taken before the answer was complete: {lengths}"
    assert page.locator("#send-button").is_disabled(), "no second message while the team is answering"
    assert page.locator("#connection-status").text_content().strip() == "Answering…"

    wait_answer(page)
    screenshot(page, "chat-answered")
    answer = page.locator(ANSWER)
    assert answer.count() == 1
    # The final message is the server's sanitised Markdown (a paragraph), no longer the streamed plain text.
    assert answer.locator("p").count() == 1
    assert answer.locator("p").text_content() == expected
    assert page.locator("li.message.assistant .source").text_content().strip() == "assistant"
    wait_until(
        page,
        "(question) => document.querySelector('li.message.user .content')?.textContent.trim() === question",
        arg=question,
        what="the user's own message, echoed by the server, on the page",
    )
    assert page.locator("#send-button").is_enabled()
    assert_no_error_shown(page, console)

    # Come back later: the history is rendered by the server, the same as it was streamed.
    page.reload()
    wait_connected(page)
    assert page.locator("li.message").count() == 2
    assert page.locator("li.message.user .content").text_content().strip() == question
    assert page.locator("li.message.assistant .content p").text_content() == expected
    assert page.locator("li.message.assistant.streaming").count() == 0
    assert_no_error_shown(page, console)


def test_model_output_cannot_run_script(conversation, logged_in_cookie, open_page):
    page, console = open_page(logged_in_cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    send(page, '[[reply:<img src=x onerror="window.pwned=1"> **bold** <script>window.pwned=2</script>]]')
    wait_answer(page)
    screenshot(page, "chat-xss")

    answer = page.locator(ANSWER)
    assert answer.locator("strong").text_content() == "bold"
    assert page.evaluate("() => typeof window.pwned") == "undefined"
    assert console.csp_violations() == [], "markup that tried to run reached the page (CSP stopped it)"
    # Neither the answer nor the echoed question carries markup that could run, even where CSP would stop it.
    assert page.locator("#messages script, #messages img, #messages [onerror]").count() == 0
    assert_no_error_shown(page, console)


def test_the_page_says_the_offline_model_answers_and_when_it_is_connected(conversation, logged_in_cookie, open_page):
    page, console = open_page(logged_in_cookie)
    response = page.goto(f"/conversations/{conversation.id}/")

    # The page's only code is a static file, under a policy that refuses inline script and style.
    policy = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy and "style-src 'self'" in policy, policy
    assert page.locator("script:not([src]), [style]").count() == 0
    banner = page.locator(".banner.offline")
    assert banner.is_visible()
    assert banner.text_content().startswith("Offline model")
    wait_connected(page)
    assert page.locator("#connection-status").is_visible()
    assert page.locator("#send-button").is_enabled()
    assert_no_error_shown(page, console)


def test_a_teams_steps_stay_folded_say_what_they_are_doing_and_the_answer_streams_below(
    owner, team, logged_in_cookie, open_page
):
    from agents_app.models import Team

    research_desk = Team.objects.get(slug="research-desk")
    conversation = services.conversation_create(owner=owner, team=research_desk)
    page, console = open_page(logged_in_cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    send(page, 'What is 17*23? [[analyst>tool:calculator {"expression": "17*23"}]] [[tps:20]]')
    # While the planner and the analyst work, the folded Steps line says who is doing what.
    wait_until(
        page,
        "() => /Steps · (planner|analyst) is (writing|calling calculator)/.test("
        "document.querySelector('li.run details.steps > summary')?.textContent || '')",
        what="the Steps line to name the agent at work",
    )
    assert page.locator("li.run details.steps").get_attribute("open") is None, "steps stay folded"
    wait_answer(page)
    screenshot(page, "team-answered")

    # The person's question as typed (no Markdown eats the asterisks), the answer outside the steps.
    question = page.locator("li.message.user .content").text_content().strip()
    assert question.startswith("What is 17*23?")
    assert page.locator("li.run .answers > li.message .source").text_content().strip() == "reporter"
    summary = page.locator("li.run details.steps > summary")
    steps = page.locator("li.run .step-list > li")
    assert summary.text_content().strip() == f"Steps ({steps.count()})" and steps.count() >= 3
    summary.click()
    assert "calculator" in page.locator("li.run .step-list").text_content()
    assert "391" in page.locator("li.run .step-list").text_content(), "the tool's result is shown in the steps"

    page.reload()
    wait_connected(page)
    assert page.locator("li.run details.steps > summary").text_content().strip() == f"Steps ({steps.count()})"
    assert_no_error_shown(page, console)


def test_the_page_survives_its_web_server_restarting_mid_answer(stack, conversation, logged_in_cookie, open_page):
    page, console = open_page(logged_in_cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)
    expected = " ".join(f"tok{i}" for i in range(1, 161))
    send(page, "[[tokens:160]] [[tps:20]]")
    wait_until(page, f"() => document.querySelector('{STREAMING}')?.textContent.length > 0", what="streaming")

    web = next(process for process in stack.processes if process.name == "daphne")
    web.stop()
    banner = page.locator("#offline-banner")
    wait_until(page, "() => !document.getElementById('offline-banner').hidden", what="the offline banner")
    assert "reconnecting" in banner.text_content()
    screenshot(page, "chat-offline")
    stack.start_web("daphne-again", port=stack.web_port)

    # The page reconnects by itself with its last seq: what it had stays, the rest follows, nothing twice.
    wait_until(page, "() => document.getElementById('offline-banner').hidden", what="the banner to go")
    partial = page.locator(STREAMING).text_content() if page.locator(STREAMING).count() else expected
    assert expected.startswith(partial.strip()), f"the streamed text after the reconnect: {partial!r}"
    wait_answer(page)
    assert page.locator(ANSWER).count() == 1
    assert page.locator(ANSWER).text_content().strip() == expected
    assert console.errors == [] and console.csp_violations() == []


def test_a_writers_replaced_draft_moves_to_the_steps_live_and_after_reload(owner, team, logged_in_cookie, open_page):
    from agents_app.models import Team

    writer_critic = Team.objects.get(slug="writer-critic")
    conversation = services.conversation_create(owner=owner, team=writer_critic)
    page, console = open_page(logged_in_cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    send(page, "Write a haiku about rain. [[critic>reply:Shorter, please.]]")
    wait_answer(page)
    wait_until(page, "() => document.querySelectorAll('li.run .answers > li.message').length === 1",
               what="one answer once the run has ended")  # fmt: skip
    live_answer = page.locator("li.run .answers > li.message .content").text_content()
    live_steps = page.locator("li.run .step-list > li").count()
    assert live_steps == 3, "the first draft and both critiques are steps"

    page.reload()
    wait_connected(page)
    assert page.locator("li.run .answers > li.message").count() == 1
    assert page.locator("li.run .answers > li.message .content").text_content() == live_answer
    assert page.locator("li.run .step-list > li").count() == live_steps
    assert_no_error_shown(page, console)


STEPS_SHOWN = """() => [...document.querySelectorAll('li.run .step-list > li')].map(li => [li.dataset.messageId,
    li.className, li.querySelector('.source').textContent.trim(), li.querySelector('.content').textContent.trim()])"""


def test_tool_calls_stay_in_the_steps_after_a_reload(owner, team, logged_in_cookie, open_page):
    """The steps a reload renders from the database are the ones the events drew live: the tool call with its
    arguments and result included, in the same place."""
    from agents_app.models import Team

    research_desk = Team.objects.get(slug="research-desk")
    conversation = services.conversation_create(owner=owner, team=research_desk)
    page, console = open_page(logged_in_cookie)
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    send(page, 'What is 17*23? [[analyst>tool:calculator {"expression": "17*23"}]]')
    wait_answer(page)
    live = page.evaluate(STEPS_SHOWN)
    calls = [step for step in live if step[0].startswith("call-")]
    assert len(calls) == 1 and calls[0][2:] == ["analyst", 'calculator({"expression": "17*23"})391'], live

    page.reload()
    wait_connected(page)
    assert page.evaluate(STEPS_SHOWN) == live
    assert page.locator("li.run details.steps > summary").text_content().strip() == f"Steps ({len(live)})"
    assert_no_error_shown(page, console)


# --- Attachments (issue 19): files chosen with the paperclip upload at once and show as chips, go with the message,
# reach the model (the offline model server describes the image and names the file), and show as a thumbnail and a
# chip in the person's message, live and after a reload.


@pytest.fixture
def stack_env(stack_env, tmp_path):
    """The web server and the worker share this test's own attachment folder."""
    return {**stack_env, "CHORUS_ATTACHMENT_DIR": str(tmp_path / "attachments")}


def png_bytes(width=12, height=8, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


FILES = [
    {"name": "red.png", "mimeType": "image/png", "buffer": png_bytes()},
    {"name": "notes.md", "mimeType": "text/markdown", "buffer": b"# Notes\nbuy milk\n"},
]


def wait_chips_ready(page, count: int) -> None:
    wait_until(
        page,
        """(count) => document.querySelectorAll('#pending-attachments li[data-state="ready"]').length === count""",
        arg=count,
        what=f"{count} uploaded file chip(s)",
    )


def test_an_image_and_a_text_file_reach_the_model_and_show_in_the_message(owner, team, open_page, tmp_path):
    conversation = services.conversation_create(owner=owner, team=team)
    page, console = open_page(cookie=session_cookie(owner))
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    page.locator("#attach-input").set_input_files(FILES)
    wait_chips_ready(page, 2)
    send(page, "What did I give you?")
    wait_answer(page)

    answer = page.locator(ANSWER).last.text_content()
    assert "I see an image of 12×8 pixels, mostly red (#c81e1e)." in answer
    assert "I read the attached notes.md." in answer
    assert page.locator("#pending-attachments li").count() == 0

    def shown():
        user = page.locator("li.message.user").last
        wait_until(
            page,
            "() => { const img = document.querySelector('li.message.user .attachments img');"
            " return img && img.complete && img.naturalWidth === 12; }",
            what="the image's thumbnail, loaded",
        )
        chip = user.locator(".attachments li.file a")
        assert chip.text_content() == "notes.md" and chip.get_attribute("download") == "notes.md"

    shown()
    page.reload()
    wait_connected(page)
    shown()
    assert_no_error_shown(page, console)
    # Both files were stored, in this test's folder (the ORM cannot be read here: Playwright's loop runs).
    assert len([p for p in (tmp_path / "attachments").rglob("*") if p.is_file()]) == 2


def test_a_chip_can_be_removed_and_a_refused_send_gives_the_files_back(owner, team, open_page):
    critic = Team.objects.get(slug="writer-critic")
    conversation = services.conversation_create(owner=owner, team=critic)
    page, console = open_page(cookie=session_cookie(owner))
    page.goto(f"/conversations/{conversation.id}/")
    wait_connected(page)

    page.locator("#attach-input").set_input_files(FILES)
    wait_chips_ready(page, 2)
    page.get_by_role("button", name="Remove notes.md").click()
    assert page.locator("#pending-attachments li").count() == 1

    send(page, "What is this?")
    wait_until(
        page,
        "() => document.getElementById('run-error').textContent.includes('vision_not_supported')",
        what="the refusal of an image for a team without vision",
    )
    wait_chips_ready(page, 1)  # given back, nothing lost
    assert page.locator("#composer-input").input_value() == "What is this?"
    assert console.errors == []
