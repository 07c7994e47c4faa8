"""Export and import: JSON that loses nothing (export, wipe, import, export again: identical), Markdown to read, the
commands' filters and refusals, and the admin's actions."""

import json
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from agents_app.domain import export, services
from agents_app.models import Conversation, Message, Run, Team, ToolCall
from tests.admin_rows import add_turn, usage_of

pytestmark = pytest.mark.django_db


@pytest.fixture
def stored(owner, other_user, team):
    """Conversations with everything a run leaves: steps, a replaced draft, tool calls (one failed, one cut off),
    a routed run, a failed one, a client_id, team memory, usage by purpose, odd text."""
    research = Team.objects.get(slug="research-desk")
    writer = Team.objects.get(slug="writer-critic")
    router = Team.objects.get(slug="automatic")

    sums = services.conversation_create(owner=owner, team=research, title="Sums")
    add_turn(sums, "What is 6*7?", steps=(("planner", "Plan: use the calculator."),),
             tool={"duration_ms": 0.1 + 0.2}, usage=usage_of(150, 50, selection=(90, 10)))  # fmt: skip
    failed_call = {"call_id": "call_2", "result": "Error: division by zero", "is_error": True}
    add_turn(sums, "And 1/0?", tool=failed_call, answer=None, status=Run.Status.FAILED,
             error=("model_timeout", "Too slow."), first_token=False)  # fmt: skip
    cut = add_turn(sums, "Once more", answer="Partial", status=Run.Status.CANCELLED)
    ToolCall.objects.create(run=cut, conversation=sums, call_id="call_3", source="analyst", name="current_time",
                            arguments="{}", seq=None)  # fmt: skip
    Message.objects.filter(run=cut, is_final_answer=True).update(incomplete=True, client_id=None)
    Conversation.objects.filter(pk=sums.pk).update(team_state={"type": "TeamState", "agent_states": {"x": [1, 2.5]}})

    draft = services.conversation_create(owner=owner, team=router, title="Haiku ```fenced``` and \u00e9")
    run = add_turn(draft, "Write a haiku", team=writer, routed_by=router, steps=(("critic", "Shorter."),),
                   answer="Rain on the roof\n\n```\ncode\n```")  # fmt: skip
    first = Message.objects.filter(run=run, source="critic").get()
    Message.objects.filter(pk=first.pk).update(source="writer", revised_seq=first.seq + 15)
    Message.objects.filter(run=run, role="user").update(client_id="c-1")

    add_turn(services.conversation_create(owner=other_user, team=team, title="Theirs"), "Hello?", answer="Hi.")
    return sums, draft


def export_text(tmp_path, *args) -> str:
    out = tmp_path / "out.txt"
    call_command("export_conversations", *args, "--output", str(out))
    return out.read_text()


def test_json_export_wipe_import_export_again_is_identical(stored, tmp_path):
    first = export_text(tmp_path)
    data = json.loads(first)
    assert data["format"] == "chorus-conversations" and data["version"] == 1
    assert len(data["conversations"]) == 3
    Conversation.objects.all().delete()
    assert not Run.objects.exists() and not Message.objects.exists() and not ToolCall.objects.exists()

    (tmp_path / "in.json").write_text(first)
    call_command("import_conversations", str(tmp_path / "in.json"))

    assert export_text(tmp_path) == first
    assert (Conversation.objects.count(), Run.objects.count(), Message.objects.count(), ToolCall.objects.count()) == (
        3, 5, 11, 3)  # fmt: skip


def test_the_json_holds_every_stored_field_of_every_row(stored):
    data = export.export_json()
    sums = next(c for c in data["conversations"] if c["title"] == "Sums")
    for model, row in ((Conversation, sums), (Run, sums["runs"][0]), (Message, sums["messages"][0]),
                       (ToolCall, sums["tool_calls"][0])):  # fmt: skip
        names = {f.name for f in model._meta.concrete_fields} - {"conversation"}
        assert names <= set(row), f"{model.__name__} lacks {names - set(row)}"
    assert sums["owner"] == "owner" and sums["team"] == "research-desk"
    assert sums["team_state"] == {"type": "TeamState", "agent_states": {"x": [1, 2.5]}}
    assert sums["runs"][0]["usage"]["speaker_selection"]["requests"] == 3
    assert [call["is_error"] for call in sums["tool_calls"]] == [False, True, False]
    assert sums["tool_calls"][0]["duration_ms"] == 0.1 + 0.2
    routed = next(c for c in data["conversations"] if c["team"] == "automatic")["runs"][0]
    assert (routed["team"], routed["routed_by"]) == ("writer-critic", "automatic")


def test_the_filters_pick_conversations_by_owner_team_and_activity(stored, tmp_path, owner):
    def titles(*args) -> list[str]:
        return sorted(c["title"] for c in json.loads(export_text(tmp_path, *args))["conversations"])

    assert titles("--user", "owner") == ["Haiku ```fenced``` and é", "Sums"]
    assert titles("--user", "other", "--user", "owner") == ["Haiku ```fenced``` and é", "Sums", "Theirs"]
    assert titles("--team", "research-desk", "--team", "assistant") == ["Sums", "Theirs"]
    Conversation.objects.filter(title="Theirs").update(updated_at=timezone.now() - timedelta(days=40))
    since = (timezone.now() - timedelta(days=1)).date().isoformat()
    assert titles("--since", since) == ["Haiku ```fenced``` and é", "Sums"]
    assert titles("--since", f"{since}T00:00:00+00:00", "--user", "other") == []


@pytest.mark.parametrize(
    "args, message",
    [(["--user", "nobody"], "No user is named nobody."), (["--team", "nope"], "No team has the slug nope."),
     (["--since", "last week"], "--since takes a date (2026-12-01) or an ISO 8601 time, not 'last week'.")],
)  # fmt: skip
def test_export_refuses_what_it_cannot_find(stored, args, message):
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call_command("export_conversations", *args)


def test_markdown_is_for_reading(stored, tmp_path):
    text = export_text(tmp_path, "--format", "markdown", "--user", "owner")
    assert text.startswith("# Chorus conversations (2)\n")
    sums = text[text.index("## Sums") :]
    assert "- Owner: owner · Team: Research desk (`research-desk`)" in sums
    assert "> What is 6*7?" in sums and "> It is **42**." in sums
    assert "#### planner · step" in sums and "· answer ·" in sums
    assert "#### Tool call `calculator` by analyst · 0.00 s" in sums and '{"expression": "6*7"}' in sums
    assert "Error:\n\n```\nError: division by zero\n```" in sums
    assert "(none)" in sums  # the call the cancelled run cut off
    assert "- Error `model_timeout`: Too slow." in sums
    assert "speaker_selection: 3 requests" in sums
    haiku = text[text.index("## Haiku") :]
    assert "Picked by Automatic: the message mentions “write”" in haiku and "replaced draft" in haiku
    assert "> ```\n> code\n> ```" in haiku  # quoted, so the model's fences cannot end anything of the export's


def test_import_refuses_stored_conversations_unless_told_to_skip_or_replace(stored, tmp_path):
    path = tmp_path / "all.json"
    path.write_text(export_text(tmp_path))
    with pytest.raises(CommandError, match="3 of these conversations are already stored"):
        call_command("import_conversations", str(path))
    call_command("import_conversations", str(path), "--skip-existing")
    assert Conversation.objects.count() == 3
    sums = Conversation.objects.get(title="Sums")
    Conversation.objects.filter(pk=sums.pk).update(title="Renamed")
    Message.objects.filter(conversation=sums, role="user").first().delete()
    call_command("import_conversations", str(path), "--replace")
    assert Conversation.objects.get(pk=sums.pk).title == "Sums"
    assert Message.objects.filter(conversation=sums).count() == 6
    assert export_text(tmp_path) == path.read_text()


def test_import_dry_run_writes_nothing(stored, tmp_path):
    path = tmp_path / "all.json"
    path.write_text(export_text(tmp_path))
    Conversation.objects.all().delete()
    call_command("import_conversations", str(path), "--dry-run")
    assert not Conversation.objects.exists()


def test_import_names_every_problem_and_writes_nothing(stored, tmp_path, django_user_model):
    data = export.export_json()
    Conversation.objects.all().delete()
    data["conversations"][0]["owner"] = "ghost"
    data["conversations"][1]["runs"][0]["team"] = "gone"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CommandError) as refused:
        call_command("import_conversations", str(path))
    assert "No user is named ghost: create them first, or import with --create-users." in str(refused.value)
    assert "No team has the slug gone: create those teams first." in str(refused.value)
    assert not Conversation.objects.exists()

    data["conversations"][1]["runs"][0]["team"] = "writer-critic"
    data["conversations"][1]["runs"][0]["status"] = "exploded"
    data["conversations"][2]["messages"][0]["created_at"] = "yesterday"
    path.write_text(json.dumps(data))
    with pytest.raises(CommandError) as refused:
        call_command("import_conversations", str(path), "--create-users")
    assert "field 'created_at'" in str(refused.value) and "'exploded' is not one of" in str(refused.value)
    assert not Conversation.objects.exists() and not django_user_model.objects.filter(username="ghost").exists()

    data["conversations"][1]["runs"][0]["status"] = "succeeded"
    data["conversations"][2]["messages"][0]["created_at"] = data["conversations"][2]["created_at"]
    data["conversations"][2]["runs"][0]["status"] = "running"
    path.write_text(json.dumps(data))
    with pytest.raises(CommandError, match="is running: a worker would take it up"):
        call_command("import_conversations", str(path), "--create-users")

    data["conversations"][2]["runs"][0]["status"] = "succeeded"
    path.write_text(json.dumps(data))
    call_command("import_conversations", str(path), "--create-users")
    ghost = django_user_model.objects.get(username="ghost")
    assert not ghost.has_usable_password() and Conversation.objects.filter(owner=ghost).count() == 1


@pytest.mark.parametrize(
    "text, message",
    [("{", "is not JSON"), ("[]", "Not a Chorus export"),
     ('{"format": "chorus-conversations", "version": 9, "conversations": []}', "version 1 of the export format"),
     ('{"format": "chorus-conversations", "version": 1, "conversations": [1]}', "must be a list of objects")],
)  # fmt: skip
def test_import_refuses_a_file_that_is_not_an_export(tmp_path, text, message, db):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(CommandError, match=message):
        call_command("import_conversations", str(path))
    with pytest.raises(CommandError, match="Cannot read"):
        call_command("import_conversations", str(tmp_path / "missing.json"))


def test_an_export_costs_the_same_queries_for_30_conversations_as_for_3(owner, team):
    def make(count):
        for _ in range(count):
            add_turn(services.conversation_create(owner=owner, team=team), tool={})

    make(3)
    with CaptureQueriesContext(connection) as few:
        export.export_json()
        export.export_markdown()
    make(27)
    with CaptureQueriesContext(connection) as many:
        export.export_json()
        export.export_markdown()
    assert len(many) == len(few) == 12  # 6 for the JSON, 6 for the Markdown (the questions to the person are one)


def test_the_admin_exports_selected_conversations_and_one_from_its_page(client, staff, stored):
    sums, draft = stored
    client.force_login(staff)
    listing = reverse("admin:agents_app_conversation_changelist")
    response = client.post(listing, {"action": "export_transcripts", "_selected_action": [str(sums.pk)]})
    assert response["Content-Disposition"] == 'attachment; filename="chorus-conversations.json"'
    assert json.loads(response.content) == export.export_json(Conversation.objects.filter(pk=sums.pk))
    response = client.post(listing, {"action": "export_transcripts_markdown",
                                     "_selected_action": [str(sums.pk), str(draft.pk)]})  # fmt: skip
    assert response["Content-Type"].startswith("text/markdown") and b"# Chorus conversations (2)" in response.content
    one = client.get(reverse("admin:agents_app_conversation_export", args=[draft.pk, "markdown"]))
    assert one.status_code == 200 and b"## Haiku" in one.content and b"## Sums" not in one.content
    assert client.get(reverse("admin:agents_app_conversation_export", args=[draft.pk, "xml"])).status_code == 404
