"""Usage per person, per team and per day: the admin's page (numbers, chart, budgets, permissions, queries whatever
the rows), a person's own page at /settings/usage/, and budgets set in the admin."""

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from agents_app.domain import services, usage
from agents_app.models import PersonSettings, Team
from tests.admin_rows import VIEW_ALL, add_turn, grant, table_row, usage_of

USAGE = "admin:agents_app_usage"
pytestmark = pytest.mark.django_db


@pytest.fixture
def spent(owner, other_user, team):
    """Today: owner 100 tokens on the assistant, 300 with a selector on the research desk; other 50. Two days
    ago: owner 1000 on the assistant."""
    research = Team.objects.get(slug="research-desk")
    mine = services.conversation_create(owner=owner, team=team)
    add_turn(mine, usage=usage_of(70, 30))
    add_turn(services.conversation_create(owner=owner, team=research), tool={},
             usage=usage_of(150, 50, selection=(90, 10)))  # fmt: skip
    add_turn(services.conversation_create(owner=other_user, team=team), usage=usage_of(40, 10))
    add_turn(mine, usage=usage_of(800, 200), when=usage.day_start() - timedelta(days=2) + timedelta(hours=5))
    return research


def test_the_usage_page_adds_up_every_request_per_person_team_and_day(client, staff, spent, settings, owner):
    settings.CHORUS_DAILY_TOKEN_BUDGET = 500
    PersonSettings.objects.create(user=owner, daily_token_budget=1000)
    client.force_login(staff)
    response = client.get(reverse(USAGE), {"days": "7"})
    assert response.status_code == 200
    page = response.content.decode()
    people = page[page.index('id="usage-people"') : page.index('id="usage-teams"')]
    # person: runs, requests, prompt, completion, total, today, budget, left
    assert table_row(people, "owner")[1:9] == ["3", "9", "1,110", "290", "1,400", "400", "1,000 (own)", "600"]
    assert table_row(people, "other")[1:9] == ["1", "2", "40", "10", "50", "50", "500", "450"]
    teams = page[page.index('id="usage-teams"') : page.index('id="usage-days"')]
    assert table_row(teams, "Assistant")[1:7] == ["3", "6", "910", "240", "1,150", "150"]
    assert table_row(teams, "Research desk")[1:7] == ["1", "5", "240", "60", "300", "300"]
    days = page[page.index('id="usage-days"') :]
    today, two_days_ago = usage.day_start().date(), (usage.day_start() - timedelta(days=2)).date()
    assert table_row(days, f"{today:%Y-%m-%d}")[1:9] == ["3", "9", "350", "100", "450", "350", "100", "0"]
    assert table_row(days, f"{two_days_ago:%Y-%m-%d}")[5] == "1,000"
    assert 'id="usage-today">450<' in page
    purposes = page[page.index("By purpose") :]
    assert table_row(purposes, "speaker_selection")[1:3] == ["3", "100"]


def test_the_chart_is_an_svg_the_server_draws_with_attributes_only(client, staff, spent):
    client.force_login(staff)
    response = client.get(reverse(USAGE), {"days": "30"})
    page = response.content.decode()
    svg = re.search(r'<svg xmlns="http://www.w3.org/2000/svg".*?</svg>', page, re.S).group(0)
    assert svg.count('<g class="usage-bar">') == 30  # a bar per day, empty days included
    assert "style=" not in svg and "<script" not in svg and "http" not in svg.replace("http://www.w3.org/2000/svg", "")
    heights = [float(h) for h in re.findall(r'height="([\d.]+)" fill="#3b5bdb"', svg)]
    assert max(heights) > 0 and heights.count(0.0) == 28  # two days with completion tokens
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", page)), "no inline script"
    csp = response["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_the_usage_page_refuses_a_bad_period_clearly(client, staff):
    client.force_login(staff)
    for days in ("0", "367", "seven", "-1"):
        response = client.get(reverse(USAGE), {"days": days})
        assert response.status_code == 400
        assert "days must be a whole number from 1 to 366" in response.content.decode()


def test_the_usage_page_is_for_staff_who_may_view_runs(client, owner, django_user_model, spent):
    assert client.get(reverse(USAGE)).status_code == 302  # to the admin's login
    client.force_login(owner)
    assert client.get(reverse(USAGE)).status_code == 302
    helper = django_user_model.objects.create_user("helper", password="helper-password-1", is_staff=True)
    client.force_login(helper)
    assert client.get(reverse(USAGE)).status_code == 403
    grant(helper, *VIEW_ALL)
    page = client.get(reverse(USAGE))
    assert page.status_code == 200 and "owner" in page.content.decode()
    assert "Usage and budgets" in client.get(reverse("admin:index")).content.decode()


def test_the_usage_page_costs_the_same_queries_for_300_runs_as_for_3(client, staff, owner, team, other_user):
    conversation = services.conversation_create(owner=owner, team=team)
    for _ in range(3):
        add_turn(conversation)
    client.force_login(staff)
    client.get(reverse(USAGE))
    with CaptureQueriesContext(connection) as few:
        client.get(reverse(USAGE))
    for index in range(297):
        who = owner if index % 2 else other_user
        add_turn(
            services.conversation_create(owner=who, team=team), when=usage.day_start() - timedelta(days=index % 20)
        )
    with CaptureQueriesContext(connection) as many:
        assert client.get(reverse(USAGE)).status_code == 200
    assert len(many) == len(few)
    print(f"usage page: {len(few)} queries for 3 runs and for 300")


def test_an_admin_sets_a_persons_budget_and_the_list_shows_what_they_used_today(client, staff, owner, spent, settings):
    settings.CHORUS_DAILY_TOKEN_BUDGET = 0
    client.force_login(staff)
    form = client.get(reverse("admin:agents_app_personsettings_add"), {"user": owner.pk})
    assert form.status_code == 200 and "CHORUS_DAILY_TOKEN_BUDGET (no limit)" in form.content.decode()
    saved = client.post(reverse("admin:agents_app_personsettings_add"), {"user": owner.pk, "daily_token_budget": "450"})
    assert saved.status_code == 302
    assert PersonSettings.objects.get(user=owner).daily_token_budget == 450
    listing = client.get(reverse("admin:agents_app_personsettings_changelist")).content.decode()
    row = table_row(listing, "owner")
    assert row[1:4] == ["450", "450", "400"]  # own budget, daily budget, used today
    assert usage.budget_refusal(owner_id=owner.pk, team=Team.objects.get(slug="assistant")) is None
    add_turn(services.conversation_create(owner=owner, team=spent), usage=usage_of(40, 10))
    assert "450 tokens" in usage.budget_refusal(owner_id=owner.pk, team=spent)


def test_a_teams_budget_is_set_on_its_page(client, staff, team):
    client.force_login(staff)
    page = client.get(reverse("admin:agents_app_team_change", args=[team.pk])).content.decode()
    assert 'name="daily_token_budget"' in page


# A person's own page --------------------------------------------------------------------------------------------


def test_a_person_sees_their_own_usage_and_budget(client, owner, spent, settings):
    settings.CHORUS_DAILY_TOKEN_BUDGET = 300
    client.force_login(owner)
    response = client.get(reverse("settings-usage"))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="usage-today">400<' in page and 'id="usage-budget">300<' in page
    assert "You have used today's budget" in page and "It resets at 00:00 UTC" in page
    assert table_row(page, "Research desk")[1:6] == ["1", "5", "240", "60", "300"]
    assert page.count('<g class="usage-bar">') == 30
    assert "<strong>1,400</strong>" in page, "the last 30 days: the person's own runs, nobody else's (50 more)"
    settings.CHORUS_DAILY_TOKEN_BUDGET = 0
    page = client.get(reverse("settings-usage"), {"days": "7"}).content.decode()
    assert 'id="usage-budget">no limit<' in page and page.count('<g class="usage-bar">') == 7


def test_the_persons_page_needs_a_login_and_a_good_period(client, owner):
    assert client.get(reverse("settings-usage")).status_code == 302
    client.force_login(owner)
    response = client.get(reverse("settings-usage"), {"days": "many"})
    assert response.status_code == 400 and "days must be a whole number" in response.content.decode()


def test_the_chart_scale_and_empty_days():
    days = [{"day": usage.day_start().date(), "prompt": 0, "completion": 0, "total": 0, "runs": 0}] * 3
    chart = usage.bar_chart(days)
    assert chart["scale"] == 1 and [bar["completion_h"] for bar in chart["bars"]] == ["0"] * 3
    assert [usage._nice_ceiling(n) for n in (1, 7, 12, 250, 999, 1001)] == [1, 10, 20, 500, 1000, 2000]
