"""Daily token budgets: per person (a default in settings, overridden per person) and per team; a message that
would go over is refused with `budget_exceeded` before anything is stored or any model asked, on the socket
and over HTTP; a run already under way finishes; the check is one query."""

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents_app.domain import services, usage
from agents_app.models import Message, PersonSettings, Run, Team
from tests.admin_rows import add_turn, usage_of
from tests.support import connect, receive_until


def spend(conversation, tokens: int, *, when=None, team=None, routed_by=None) -> Run:
    """A finished run of `tokens` tokens (prompt and completion), created at `when` (now by default)."""
    return add_turn(conversation, "Spend", usage=usage_of(tokens - tokens // 3, tokens // 3), when=when, team=team,
                    routed_by=routed_by)  # fmt: skip


@pytest.fixture
def budget(settings):
    settings.CHORUS_DAILY_TOKEN_BUDGET = 1000
    return 1000


# The rule --------------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_no_budget_means_no_limit(owner, conversation, settings):
    settings.CHORUS_DAILY_TOKEN_BUDGET = 0
    spend(conversation, 10_000_000)
    assert usage.budget_refusal(owner_id=owner.pk, team=conversation.team) is None


@pytest.mark.django_db
def test_the_default_budget_counts_todays_runs_of_every_conversation_of_the_person(owner, team, budget):
    first = services.conversation_create(owner=owner, team=team)
    second = services.conversation_create(owner=owner, team=team)
    spend(first, 600)
    assert usage.budget_refusal(owner_id=owner.pk, team=team) is None
    spend(second, 400)
    refusal = usage.budget_refusal(owner_id=owner.pk, team=team)
    assert refusal.startswith("You have used your daily budget of 1,000 tokens (1,000 today).")
    assert "It resets at 00:00 UTC (" in refusal


@pytest.mark.django_db
def test_yesterdays_runs_and_other_peoples_do_not_count(owner, other_user, team, budget):
    mine = services.conversation_create(owner=owner, team=team)
    theirs = services.conversation_create(owner=other_user, team=team)
    spend(mine, 5000, when=usage.day_start() - timedelta(seconds=1))
    spend(theirs, 5000)
    assert usage.budget_refusal(owner_id=owner.pk, team=team) is None
    assert usage.budget_refusal(owner_id=other_user.pk, team=team) is not None


@pytest.mark.django_db
def test_an_admin_gives_one_person_another_budget_or_none(owner, conversation, budget):
    spend(conversation, 1500)
    assert usage.budget_refusal(owner_id=owner.pk, team=conversation.team) is not None
    settings_row = PersonSettings.objects.create(user=owner, daily_token_budget=2000)
    assert usage.budget_refusal(owner_id=owner.pk, team=conversation.team) is None
    settings_row.daily_token_budget = 0  # no limit for this person
    settings_row.save()
    spend(conversation, 100_000)
    assert usage.budget_refusal(owner_id=owner.pk, team=conversation.team) is None
    settings_row.daily_token_budget = None  # back to the default
    settings_row.save()
    assert "1,000 tokens" in usage.budget_refusal(owner_id=owner.pk, team=conversation.team)


@pytest.mark.django_db
def test_a_teams_budget_is_shared_by_everyone_and_a_routers_counts_what_it_routed(owner, other_user, team):
    Team.objects.filter(pk=team.pk).update(daily_token_budget=500)
    team.refresh_from_db()
    spend(services.conversation_create(owner=other_user, team=team), 499)
    assert usage.budget_refusal(owner_id=owner.pk, team=team) is None
    spend(services.conversation_create(owner=other_user, team=team), 1)
    refusal = usage.budget_refusal(owner_id=owner.pk, team=team)
    assert refusal.startswith("The team “Assistant” has used its daily budget of 500 tokens.")
    assert usage.team_budget_refusal(team=team) == refusal

    router = Team.objects.get(slug="automatic")
    router.daily_token_budget = 100
    router.save()
    routed = services.conversation_create(owner=owner, team=router)
    spend(routed, 60, team=Team.objects.get(slug="writer-critic"), routed_by=router)
    assert usage.budget_refusal(owner_id=owner.pk, team=router) is None
    spend(routed, 40, team=Team.objects.get(slug="writer-critic"), routed_by=router)
    assert "“Automatic” has used" in usage.budget_refusal(owner_id=owner.pk, team=router)


@pytest.mark.django_db
def test_the_check_is_one_query(owner, conversation, budget):
    Team.objects.filter(pk=conversation.team.pk).update(daily_token_budget=10)
    conversation.team.refresh_from_db()
    with CaptureQueriesContext(connection) as queries:
        usage.budget_refusal(owner_id=owner.pk, team=conversation.team)
    assert len(queries) == 1


def test_the_reset_is_the_next_utc_midnight():
    from datetime import UTC, datetime

    now = datetime(2026, 12, 6, 20, 48, 30, tzinfo=UTC)
    assert usage.next_reset(now) == datetime(2026, 12, 7, tzinfo=UTC)
    assert usage.seconds_until_reset(now) == 3 * 3600 + 11 * 60 + 30
    assert usage.resets_sentence(now) == "It resets at 00:00 UTC (2026-12-07 00:00 UTC), in 3 h 12 min."


# The send path ---------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_send_over_budget_stores_nothing_and_says_when_it_resets(owner, conversation, budget):
    spend(conversation, 1000)
    before = (Message.objects.count(), Run.objects.count())
    with pytest.raises(services.ChatError) as refused:
        services.message_send(conversation=conversation, content="One more?", client_id="c-9")
    assert refused.value.code == "budget_exceeded" and "resets at 00:00 UTC" in refused.value.detail
    assert (Message.objects.count(), Run.objects.count()) == before


@pytest.mark.django_db
def test_http_answers_429_with_retry_after(client, owner, conversation, budget):
    spend(conversation, 1200)
    client.force_login(owner)
    before = Run.objects.count()
    response = client.post(
        f"/api/conversations/{conversation.id}/messages/", data={"content": "More?"}, content_type="application/json"
    )
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded" and "(1,200 today)" in error["detail"]
    seconds = int(response["Retry-After"])
    assert 0 < seconds <= 86400
    assert abs((usage.next_reset() - timezone.now()).total_seconds() - seconds) < 5
    assert Run.objects.count() == before


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_socket_sends_an_error_frame_and_a_run_in_progress_finishes(owner, team, budget, model):
    """A message sent with room starts its run; the budget is spent meanwhile (by another conversation's run);
    the run still finishes with its answer, and the next message is refused with an error frame."""
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=team)
    elsewhere = await sync_to_async(services.conversation_create)(owner=owner, team=team)
    chat = await connect(conversation, owner)
    assert (await chat.connect())[0]
    try:
        await chat.receive_json_from()  # hello
        await chat.send_json_to({"type": "send", "content": "Count slowly [[tokens:40]] [[tps:40]]"})
        started = await receive_until(chat, "run.started", timeout=15)
        await sync_to_async(spend)(elsewhere, 5000)  # the day's budget is gone while the answer streams

        finished = (await receive_until(chat, "run.finished", timeout=30))[-1]
        assert finished["run_id"] == started[-1]["run_id"] and finished["status"] == "succeeded"
        assert finished["usage"]["completion_tokens"] > 0

        runs_before = await Run.objects.filter(conversation=conversation).acount()
        await chat.send_json_to({"type": "send", "content": "And now?"})
        error = await chat.receive_json_from(timeout=10)
        assert error["type"] == "error" and error["code"] == "budget_exceeded" and "seq" not in error
        assert "resets at 00:00 UTC" in error["detail"]
        assert await chat.receive_nothing(timeout=0.3)
        assert await Run.objects.filter(conversation=conversation).acount() == runs_before
    finally:
        await chat.disconnect()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_router_that_picks_a_team_over_its_budget_fails_the_run_before_the_teams_request(owner, team, model):
    writer_critic = await Team.objects.aget(slug="writer-critic")
    writer_critic.daily_token_budget = 10
    await writer_critic.asave()
    await sync_to_async(spend)(await sync_to_async(services.conversation_create)(owner=owner, team=writer_critic), 10)
    router = await Team.objects.aget(slug="automatic")
    conversation = await sync_to_async(services.conversation_create)(owner=owner, team=router)
    chat = await connect(conversation, owner)
    await chat.connect()
    try:
        await chat.receive_json_from()
        await chat.send_json_to({"type": "send", "content": "Write a haiku about rain."})  # a rule: writer-critic
        events = await receive_until(chat, "run.finished", timeout=15)
    finally:
        await chat.disconnect()
    finished = events[-1]
    assert finished["status"] == "failed" and finished["error"]["code"] == "budget_exceeded"
    assert "“Writer and critic” has used its daily budget" in finished["error"]["detail"]
    assert [e["type"] for e in events] == ["message", "conversation.updated", "run.finished"], (
        "no team event: it never asked its model"
    )
    run = await Run.objects.aget(id=finished["run_id"])
    assert run.team_id == writer_critic.pk and run.routed_by_id == router.pk
