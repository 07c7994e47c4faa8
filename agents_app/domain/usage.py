"""What the models cost: tokens per person, per team and per day, and the daily budgets a new message must fit.

A run's tokens are every request it made to a model (its agents', a selector's choices of the next speaker, a
router's pick: `Run.usage` by purpose; `prompt_tokens` and `completion_tokens` are the sums), recorded when
the run ends. A day is a UTC day: budgets count the runs created since 00:00 UTC and reset then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import BigIntegerField, Count, F, Q, Sum, Value
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce, TruncDate
from django.utils import timezone

from agents_app.models import Conversation, PersonSettings, Run, Team

PURPOSES = ("agent", "speaker_selection", "routing")
MAX_DAYS = 366  # the longest period the usage pages show


# Budgets ---------------------------------------------------------------------------------------------------


def day_start(moment: datetime | date | None = None) -> datetime:
    """00:00 UTC of the day of `moment` (now by default): where a budget's day begins."""
    if moment is None:
        moment = timezone.now()
    day = moment.astimezone(UTC).date() if isinstance(moment, datetime) else moment
    return datetime.combine(day, time.min, tzinfo=UTC)


def next_reset(now: datetime | None = None) -> datetime:
    """When today's budgets reset: the next 00:00 UTC."""
    return day_start(now) + timedelta(days=1)


def seconds_until_reset(now: datetime | None = None) -> int:
    """Whole seconds until the budgets reset (at least 1): an HTTP answer's Retry-After."""
    now = now or timezone.now()
    return max(1, math.ceil((next_reset(now) - now).total_seconds()))


def effective_budget(override: int | None) -> int | None:
    """A person's daily budget: their own when an admin set one (0 meaning no limit for them), else
    CHORUS_DAILY_TOKEN_BUDGET (0 meaning no limit); None for no limit."""
    value = settings.CHORUS_DAILY_TOKEN_BUDGET if override is None else override
    return value or None


def reset_time(now: datetime | None = None) -> str:
    """When budgets next reset, for people: "00:00 UTC (2026-12-07 00:00 UTC), in 3 h 12 min"."""
    now = now or timezone.now()
    reset = next_reset(now)
    minutes = max(1, math.ceil((reset - now).total_seconds() / 60))
    wait = f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
    return f"00:00 UTC ({reset:%Y-%m-%d %H:%M} UTC), in {wait}"


def resets_sentence(now: datetime | None = None) -> str:
    return f"It resets at {reset_time(now)}."


def budget_refusal(*, owner_id, team: Team, now: datetime | None = None) -> str | None:
    """Why a new message of this person, in a conversation of this team, must be refused: their daily budget
    or the team's is spent. None when both have room (or no limit).

    One query, on the path of every message: the person's own budget and what they and the team have used
    today, each an indexed aggregate (runs by conversation and date, by team and date). A run in progress
    counts when it ends; it is never stopped for the budget."""
    now = now or timezone.now()
    team_budget = team.daily_token_budget or None
    override, person_spent, team_spent = _spent_today(owner_id, team.pk if team_budget else None, day_start(now))
    person_budget = effective_budget(override)
    if person_budget is not None and person_spent >= person_budget:
        return (
            f"You have used your daily budget of {person_budget:,} tokens ({person_spent:,} today). "
            f"{resets_sentence(now)}"
        )
    if team_budget is not None and team_spent >= team_budget:
        return f"The team “{team.name}” has used its daily budget of {team_budget:,} tokens. {resets_sentence(now)}"
    return None


def team_budget_refusal(*, team: Team, now: datetime | None = None) -> str | None:
    """Why a run of this team must not start: its daily budget is spent (for a team a router picked, checked
    after the pick and before the team's first request). None when it has room or no limit."""
    if not team.daily_token_budget:
        return None
    now = now or timezone.now()
    _override, _person, spent = _spent_today(None, team.pk, day_start(now))
    if spent >= team.daily_token_budget:
        return (
            f"The team “{team.name}” has used its daily budget of {team.daily_token_budget:,} tokens. "
            f"{resets_sentence(now)}"
        )
    return None


def _spent_today(owner_id, team_id, since: datetime) -> tuple[int | None, int, int]:
    """(the person's own budget or None, tokens of their runs created since `since`, tokens of the team's runs
    created since `since`), in ONE statement; the team's part only when `team_id` is given.

    A team's runs are those it answered and, for a router, those it routed. Written in SQL, as the other checks
    on the path of every message are (services._user_run_counts): the ORM would compile it each time."""
    runs, conversations = Run._meta.db_table, Conversation._meta.db_table
    people = PersonSettings._meta.db_table
    created = Run._meta.get_field("created_at").get_db_prep_value(since, connection)
    person_part, person_params = "0", []
    if owner_id is not None:
        person_part = f"""(SELECT COALESCE(SUM(r.prompt_tokens + r.completion_tokens), 0)
            FROM {runs} r JOIN {conversations} c ON c.id = r.conversation_id
            WHERE c.owner_id = %s AND r.created_at >= %s)"""  # noqa: S608 - table names from the models
        person_params = [owner_id, created]
    team_part, team_params = "0", []
    if team_id is not None:
        # Each side of the OR is one index range: (team_id, created_at) and (routed_by_id, created_at).
        team_part = f"""(SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM {runs}
            WHERE (team_id = %s AND created_at >= %s) OR (routed_by_id = %s AND created_at >= %s))"""  # noqa: S608
        team_params = [team_id, created, team_id, created]
    query = f"""
        SELECT (SELECT daily_token_budget FROM {people} WHERE user_id = %s), {person_part}, {team_part}
    """  # noqa: S608 - table names from the models, values as parameters
    with connection.cursor() as cursor:
        cursor.execute(query, [owner_id, *person_params, *team_params])
        override, person_spent, team_spent = cursor.fetchone()
    return (None if override is None else int(override)), int(person_spent), int(team_spent)


# Usage -----------------------------------------------------------------------------------------------------


def _sum(expression, **extra):
    return Coalesce(Sum(expression, **extra), Value(0), output_field=BigIntegerField())


def _purpose_part(purpose: str, part: str):
    return Cast(KT(f"usage__{purpose}__{part}"), BigIntegerField())


def _sums(today: datetime | None = None) -> dict:
    """The aggregates of a group of runs: runs, tokens (prompt, completion, total), and requests and tokens by
    purpose; with `today`, the tokens of runs created since then too."""
    total = F("prompt_tokens") + F("completion_tokens")
    sums = {
        "runs": Count("id"),
        "prompt": _sum("prompt_tokens"),
        "completion": _sum("completion_tokens"),
        "total": _sum(total),
    }
    for purpose in PURPOSES:
        sums[f"{purpose}_requests"] = _sum(_purpose_part(purpose, "requests"))
        sums[f"{purpose}_tokens"] = _sum(
            _purpose_part(purpose, "prompt_tokens") + _purpose_part(purpose, "completion_tokens")
        )
    if today is not None:
        sums["today"] = _sum(total, filter=Q(created_at__gte=today))
    return sums


def _finish_row(row: dict) -> dict:
    row["requests"] = sum(row[f"{purpose}_requests"] for purpose in PURPOSES)
    row["purposes"] = [
        {"name": purpose, "requests": row[f"{purpose}_requests"], "tokens": row[f"{purpose}_tokens"]}
        for purpose in PURPOSES
    ]
    return row


def _empty_row(**fields) -> dict:
    row = {"runs": 0, "prompt": 0, "completion": 0, "total": 0, "today": 0}
    row.update({f"{purpose}_{part}": 0 for purpose in PURPOSES for part in ("requests", "tokens")})
    row.update(fields)
    return _finish_row(row)


_COUNTS = ("runs", "prompt", "completion", "total", "today",
           *(f"{purpose}_{part}" for purpose in PURPOSES for part in ("requests", "tokens")))  # fmt: skip


def _add(row: dict, other: dict | None) -> None:
    for key in _COUNTS:
        row[key] += (other or {}).get(key, 0)


@dataclass(frozen=True)
class Period:
    """The last `days` UTC days, today included."""

    days: int
    today: date

    @classmethod
    def last(cls, days: int, now: datetime | None = None) -> Period:
        return cls(days=days, today=day_start(now).date())

    @property
    def first(self) -> date:
        return self.today - timedelta(days=self.days - 1)

    @property
    def since(self) -> datetime:
        return day_start(self.first)

    @property
    def until(self) -> datetime:
        return day_start(self.today) + timedelta(days=1)

    def runs(self, queryset=None):
        queryset = Run.objects.all() if queryset is None else queryset
        return queryset.filter(created_at__gte=self.since, created_at__lt=self.until)


def parse_days(raw: str | None, default: int = 30) -> int:
    """The `?days=` of a usage page: a whole number from 1 to MAX_DAYS. ValueError with a sentence otherwise."""
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_DAYS:
        raise ValueError(f"days must be a whole number from 1 to {MAX_DAYS}, not {raw[:20]!r}.")
    return int(raw)


def usage_by_day(runs, period: Period) -> list[dict]:
    """One row per day of the period (days without runs included, as zeros), oldest first."""
    rows = runs.annotate(day=TruncDate("created_at", tzinfo=UTC)).values("day").annotate(**_sums()).order_by("day")
    found = {row["day"]: _finish_row(row) for row in rows}
    return [found.get(period.first + timedelta(days=i)) or _empty_row(day=period.first + timedelta(days=i))
            for i in range(period.days)]  # fmt: skip


def usage_totals(days: list[dict]) -> dict:
    totals = _empty_row()
    for row in days:
        _add(totals, row)
    return _finish_row(totals)


def usage_by_person(runs, period: Period, limit: int = 200) -> list[dict]:
    """The people who used tokens in the period, most first (at most `limit`), each with what they used today,
    their daily budget (None: no limit) and what is left of it."""
    username = f"conversation__owner__{get_user_model().USERNAME_FIELD}"
    rows = list(
        runs.values(user_id=F("conversation__owner_id"), username=F(username))
        .annotate(**_sums(today=day_start(period.today)))
        .order_by("-total", "username")[:limit]
    )
    own = {
        user_id: (pk, budget)
        for user_id, pk, budget in PersonSettings.objects.filter(user_id__in=[row["user_id"] for row in rows])
        .values_list("user_id", "pk", "daily_token_budget")
    }  # fmt: skip
    for row in rows:
        _finish_row(row)
        row["settings_id"], row["override"] = own.get(row["user_id"], (None, None))
        row["budget"] = effective_budget(row["override"])
        row["left"] = None if row["budget"] is None else max(0, row["budget"] - row["today"])
    return rows


def usage_by_team(runs, period: Period) -> list[dict]:
    """Each team that answered in the period, most tokens first, with its budget. A router's row counts the
    runs it routed (they count under the team that answered too), as its budget does."""
    today = day_start(period.today)
    answered = {row["team_id"]: row for row in runs.values("team_id").annotate(**_sums(today=today))}
    routed = {
        row["router_id"]: row
        for row in runs.filter(routed_by__isnull=False).values(router_id=F("routed_by_id")).annotate(**_sums(today))
    }
    teams = Team.objects.in_bulk(set(answered) | set(routed))
    rows = []
    for team_id, team in teams.items():
        row = _empty_row()
        _add(row, answered.get(team_id))
        _add(row, routed.get(team_id))
        _finish_row(row)
        budget = team.daily_token_budget or None
        row.update(team=team, is_router=team.kind == Team.Kind.ROUTER, budget=budget,
                   left=None if budget is None else max(0, budget - row["today"]))  # fmt: skip
        rows.append(row)
    rows.sort(key=lambda row: (-row["total"], row["team"].name))
    return rows


def person_usage(user, period: Period, *, now: datetime | None = None) -> dict:
    """A person's own usage: today against their budget, each day of the period, and by team."""
    now = now or timezone.now()
    runs = period.runs(Run.objects.filter(conversation__owner=user))
    days = usage_by_day(runs, period)
    by_team = [
        _finish_row(row) for row in runs.values("team__name").annotate(**_sums()).order_by("-total", "team__name")
    ]
    override = PersonSettings.objects.filter(user=user).values_list("daily_token_budget", flat=True).first()
    budget = effective_budget(override)
    today = days[-1]["total"] if period.today == day_start(now).date() else 0
    return {
        "by_day": days,
        "days_newest_first": list(reversed(days)),
        "totals": usage_totals(days),
        "by_team": by_team,
        "today": today,
        "budget": budget,
        "left": None if budget is None else max(0, budget - today),
        "spent": budget is not None and today >= budget,
        "resets_at": next_reset(now),
        "resets": resets_sentence(now),
        "chart": bar_chart(days),
    }


# The chart -------------------------------------------------------------------------------------------------


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 × 10^n at least `value` (1 for 0): the top of the chart's scale."""
    if value <= 0:
        return 1
    power = 10 ** max(0, len(str(value)) - 1)
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _short(number: int) -> str:
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if number >= size:
            return f"{number / size:.3g}{suffix}"
    return str(number)


def bar_chart(days: list[dict], *, width: int = 720, height: int = 180) -> dict:
    """Tokens per day as stacked bars (prompt below, completion above), as numbers for an SVG the template
    draws with attributes only: no script, no style attribute (the page's CSP allows neither)."""
    left, right, top, bottom = 52, 8, 10, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    scale = _nice_ceiling(max((row["total"] for row in days), default=0))
    slot = plot_w / max(1, len(days))
    bar = max(1.0, slot * 0.72)
    label_every = max(1, math.ceil(len(days) / 8))
    bars, labels = [], []
    for index, row in enumerate(days):
        x = left + index * slot + (slot - bar) / 2
        prompt_h = row["prompt"] / scale * plot_h
        completion_h = row["completion"] / scale * plot_h
        base = top + plot_h
        bars.append({
            "x": _n(x), "width": _n(bar),
            "prompt_y": _n(base - prompt_h), "prompt_h": _n(prompt_h),
            "completion_y": _n(base - prompt_h - completion_h), "completion_h": _n(completion_h),
            "title": f"{row['day']:%Y-%m-%d}: {row['total']:,} tokens ({row['prompt']:,} prompt, "
                     f"{row['completion']:,} completion), {row['runs']:,} runs",
        })  # fmt: skip
        if (len(days) - 1 - index) % label_every == 0:  # evenly spaced, the last day (today) always labelled
            labels.append({"x": _n(x + bar / 2), "text": f"{row['day']:%b} {row['day'].day}"})
    grid = [{"y": _n(top + plot_h - fraction * plot_h), "text": _short(int(scale * fraction))}
            for fraction in (0, 0.5, 1)]  # fmt: skip
    return {"width": width, "height": height, "left": left, "right": width - right, "axis_x": left - 6,
            "label_y": height - 6, "bars": bars, "labels": labels, "grid": grid, "scale": scale}  # fmt: skip


def _n(value: float) -> str:
    """A coordinate as SVG takes it, whatever the locale: at most one decimal."""
    return f"{value:.1f}".removesuffix(".0")
