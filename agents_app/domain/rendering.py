"""Messages as HTML. Model output is untrusted text: rendered as Markdown, highlighted, then sanitised with an
allow-list. A person's own words are shown as typed.

Maths: `$...$` and `$$...$$` are kept out of Markdown (so `*`, `_` and `\\` inside them survive) and sent as
`<span class="math-inline">` / `<span class="math-display">` holding the TeX as text; the page typesets them
with KaTeX (static/chorus/markdown-live.js), which renders the same spans while the message streams."""

import re
import threading
import xml.etree.ElementTree as etree
from functools import lru_cache
from html import escape

import markdown
import nh3
from markdown.extensions import Extension
from markdown.inlinepatterns import InlineProcessor
from markdown.util import AtomicString
from pygments.formatters import HtmlFormatter
from pygments.token import STANDARD_TYPES

_ALLOWED_TAGS = {
    "p", "br", "hr", "em", "strong", "del", "code", "pre", "blockquote", "ul", "ol", "li", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "span", "div",
}  # fmt: skip
_ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "th": {"align"}, "td": {"align"}}
# The only classes kept: the highlighter's, which the server adds itself (codehilite's wrapper and Pygments'
# token classes). Any other class, from HTML in the model's text, is dropped: model output cannot borrow the
# page's own classes (a `banner offline` that looks like Chorus speaking).
# Also kept: the code block's language label (Pygments' `filename` span) and the maths spans, which only make
# their text look like a label or typeset it as maths.
_ALLOWED_CLASSES = {
    "div": {"highlight"},
    "span": {name for name in STANDARD_TYPES.values() if name} | {"filename", "math-inline", "math-display"},
}
_EMPTY_CLASS = re.compile(r'<(div|span) class="">')  # what nh3 leaves of a class it emptied


@lru_cache(maxsize=1024)
def render_plain(text: str) -> str:
    """A person's own words as they typed them: every character shown (no Markdown: "2*3 and 4*5" keeps its
    asterisks, "<b>" is text), paragraphs and line breaks kept."""
    paragraphs = [part.strip("\n") for part in text.replace("\r\n", "\n").split("\n\n") if part.strip()]
    return "".join(f"<p>{escape(part).replace(chr(10), '<br>')}</p>" for part in paragraphs)


class _LabelledHtmlFormatter(HtmlFormatter):
    """Pygments' HTML with the fence's language as a label: codehilite hands the formatter `lang_str`
    ("language-python"), which becomes Pygments' own `<span class="filename">` above the code."""

    def __init__(self, lang_str: str = "", **options):
        language = lang_str.removeprefix("language-")
        super().__init__(filename="" if language == "text" else language[:30], **options)


# Pandoc's rule, so prices stay text ("$5 and $10"): an opening `$` is followed by a non-space, a closing one
# follows a non-space and is not followed by a digit; `\$` is a dollar sign. The page's renderer uses the same.
_DISPLAY_MATH = r"(?<!\\)\$\$(?P<tex>[^$]+?)\$\$"
_INLINE_MATH = r"(?<![\\$])\$(?P<tex>[^\s$](?:[^$\n]*?[^\s$\\])?)\$(?![\d$])"


class _MathProcessor(InlineProcessor):
    def __init__(self, pattern: str, css_class: str):
        super().__init__(pattern)
        self.css_class = css_class

    def handleMatch(self, m, data):  # noqa: N802 (Python-Markdown's name)
        span = etree.Element("span", {"class": self.css_class})
        span.text = AtomicString(m.group("tex").strip())  # shown as text: never Markdown, never HTML
        return span, m.start(0), m.end(0)


class _MathExtension(Extension):
    def extendMarkdown(self, md):  # noqa: N802 (Python-Markdown's name)
        md.ESCAPED_CHARS = [*md.ESCAPED_CHARS, "$"]  # `\$` is a dollar sign, as in CommonMark
        # Between code spans (190: `$` in code stays code) and backslash escapes (180).
        md.inlinePatterns.register(_MathProcessor(_DISPLAY_MATH, "math-display"), "math-display", 186)
        md.inlinePatterns.register(_MathProcessor(_INLINE_MATH, "math-inline"), "math-inline", 185)


_converters = threading.local()


def _converter() -> markdown.Markdown:
    """This thread's Markdown converter. Building one loads its extensions, which cost more than converting a
    short answer; a converter is not thread-safe, so each thread keeps its own and resets it per text."""
    converter = getattr(_converters, "markdown", None)
    if converter is None:
        converter = _converters.markdown = markdown.Markdown(
            extensions=["fenced_code", "codehilite", "tables", "sane_lists", _MathExtension()],
            extension_configs={
                "codehilite": {
                    "guess_lang": False,
                    "css_class": "highlight",
                    "pygments_formatter": _LabelledHtmlFormatter,
                },
                "tables": {"use_align_attribute": True},  # a column's alignment survives sanitising (no style)
            },
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
