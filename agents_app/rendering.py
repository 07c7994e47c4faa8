"""Messages as HTML. Model output is untrusted text: rendered as Markdown, highlighted, then sanitised with an
allow-list. A person's own words are shown as typed."""

import re
import threading
from functools import lru_cache
from html import escape

import markdown
import nh3
from pygments.token import STANDARD_TYPES

_ALLOWED_TAGS = {
    "p", "br", "hr", "em", "strong", "del", "code", "pre", "blockquote", "ul", "ol", "li", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "span", "div",
}  # fmt: skip
_ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "th": {"align"}}
# The only classes kept: the highlighter's, which the server adds itself (codehilite's wrapper and Pygments'
# token classes). Any other class, from HTML in the model's text, is dropped: model output cannot borrow the
# page's own classes (a `banner offline` that looks like Chorus speaking).
_ALLOWED_CLASSES = {"div": {"highlight"}, "span": {name for name in STANDARD_TYPES.values() if name}}
_EMPTY_CLASS = re.compile(r'<(div|span) class="">')  # what nh3 leaves of a class it emptied


@lru_cache(maxsize=1024)
def render_plain(text: str) -> str:
    """A person's own words as they typed them: every character shown (no Markdown: "2*3 and 4*5" keeps its
    asterisks, "<b>" is text), paragraphs and line breaks kept."""
    paragraphs = [part.strip("\n") for part in text.replace("\r\n", "\n").split("\n\n") if part.strip()]
    return "".join(f"<p>{escape(part).replace(chr(10), '<br>')}</p>" for part in paragraphs)


_converters = threading.local()


def _converter() -> markdown.Markdown:
    """This thread's Markdown converter. Building one loads its extensions, which cost more than converting a
    short answer; a converter is not thread-safe, so each thread keeps its own and resets it per text."""
    converter = getattr(_converters, "markdown", None)
    if converter is None:
        converter = _converters.markdown = markdown.Markdown(
            extensions=["fenced_code", "codehilite", "tables", "sane_lists"],
            extension_configs={"codehilite": {"guess_lang": False, "css_class": "highlight"}},
            output_format="html",
        )
    return converter


@lru_cache(maxsize=1024)
def render_markdown(text: str) -> str:
    """Safe HTML for a model's message: no script, no event handler, no style, no class but the highlighter's,
    links only to http(s)/mailto."""
    html = _converter().reset().convert(text)
    clean = nh3.clean(
        html,
        tags=_ALLOWED_TAGS,
        attributes=_ALLOWED_ATTRIBUTES,
        allowed_classes=_ALLOWED_CLASSES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )
    return _EMPTY_CLASS.sub(r"<\1>", clean)
