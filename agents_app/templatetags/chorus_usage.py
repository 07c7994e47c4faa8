"""Template filters for the usage and transcript pages: token counts and durations as people read them."""

from datetime import timedelta

from django import template

register = template.Library()


@register.filter
def tokens(value) -> str:
    """1234567 -> "1,234,567"; None -> "—"."""
    if value is None or value == "":
        return "—"
    return f"{int(value):,}"


@register.filter
def seconds(value) -> str:
    """A timedelta as "0.42 s" (or "2 min 5 s" past a minute); None -> "—"."""
    if not isinstance(value, timedelta):
        return "—"
    total = value.total_seconds()
    if total < 60:
        return f"{total:.2f} s"
    minutes, rest = divmod(int(round(total)), 60)
    return f"{minutes} min {rest} s"


@register.filter
def budget(value) -> str:
    """A daily budget: None (no limit) -> "no limit"."""
    return "no limit" if value is None else f"{int(value):,}"
