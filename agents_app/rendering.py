"""Model output is untrusted text: rendered here as Markdown, highlighted, then sanitised with an allow-list."""

from functools import lru_cache

import markdown
import nh3

_ALLOWED_TAGS = {
    "p", "br", "hr", "em", "strong", "del", "code", "pre", "blockquote", "ul", "ol", "li", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "span", "div",
}  # fmt: skip
_ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "span": {"class"}, "div": {"class"}, "code": {"class"}, "th": {"align"}}


@lru_cache(maxsize=1024)
def render_markdown(text: str, *, escape_html: bool = False) -> str:
    """Safe HTML for a message: no script, no event handler, no style, links only to http(s)/mailto.

    With `escape_html` (a person's own words), HTML they typed is shown as text rather than removed.
    """
    if escape_html:
        text = text.replace("&", "&amp;").replace("<", "&lt;")
    html = markdown.markdown(
        text,
        extensions=["fenced_code", "codehilite", "tables", "sane_lists"],
        extension_configs={"codehilite": {"guess_lang": False, "css_class": "highlight"}},
        output_format="html",
    )
    return nh3.clean(
        html,
        tags=_ALLOWED_TAGS,
        attributes=_ALLOWED_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )
