"""The chat socket through the real ASGI application (auth middleware, origin check, consumer, embedded worker),
with the in-memory channel layer and the offline model server."""

import json

import pytest
from asgiref.sync import sync_to_async

from agents_app.models import Message, Run
from agents_app.realtime import fanout
from tests.support import connect, receive_until

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def test_it_refuses_an_anonymous_socket(conversation):
    communicator = await connect(conversation)
    connected, _ = await communicator.connect()
    assert not connected


async def test_it_refuses_another_users_socket(conversation, other_user):
    communicator = await connect(conversation, other_user)
    connected, _ = await communicator.connect()
    assert not connected


async def test_it_refuses_a_socket_from_a_foreign_origin(conversation, owner):
    communicator = await connect(conversation, owner, origin=(b"origin", b"http://evil.example"))
    connected, _ = await communicator.connect()
    assert not connected


async def test_it_greets_the_owner_with_hello(conversation, owner):
    communicator = await connect(conversation, owner)
    connected, _ = await communicator.connect()
    assert connected
    hello = await communicator.receive_json_from()
    assert hello == {
        "type": "hello",
        "seq": 0,
        "conversation_id": str(conversation.id),
        "last_seq": 0,
        "active_run_id": None,
    }
    await communicator.disconnect()


async def test_send_streams_an_answer_in_seq_order_and_persists_it(conversation, owner, model):
    communicator = await connect(conversation, owner)
    await communicator.connect()
    await communicator.receive_json_from()

    await communicator.send_json_to({"type": "send", "content": "Tell me something [[tokens:30]]", "client_id": "c-1"})
    events = await receive_until(communicator, "run.finished")
    await communicator.disconnect()

    types = [e["type"] for e in events]
    # The first message names the conversation: conversation.updated follows its echo.
    assert types[:3] == ["message", "conversation.updated", "run.started"]
    assert events[1]["title"] == "Tell me something [[tokens:30]]"
    assert types[-2:] == ["message", "run.finished"]
    assert set(types[3:-2]) == {"token"} and len(types[3:-2]) >= 3
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    echo, answer, finished = events[0]["message"], events[-2]["message"], events[-1]
    assert echo["role"] == "user" and echo["content"] == "Tell me something [[tokens:30]]"
    tokens = [e for e in events if e["type"] == "token"]
    assert {t["stream_id"] for t in tokens} == {answer["id"]}
    assert "".join(t["delta"] for t in tokens) == answer["content"]
    assert answer["content"].split() == [f"tok{i}" for i in range(1, 31)]
    assert answer["is_final_answer"] and answer["source"] == "assistant"
    assert finished["status"] == "succeeded" and finished["error"] is None
    assert finished["usage"]["completion_tokens"] == 30

    stored = await sync_to_async(list)(Message.objects.filter(conversation=conversation).values_list("content", "seq"))
    assert stored == [(echo["content"], echo["seq"]), (answer["content"], answer["seq"])]
    run = await Run.objects.aget(conversation=conversation)
    assert run.status == "succeeded" and run.completion_tokens == 30


@pytest.mark.parametrize(
    "frame, code",
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ('{"content": "no type"}', "invalid_frame"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "send", "content": "   "}', "empty_message"),
        ('{"type": "send", "content": 42}', "invalid_frame"),
        ('{"type": "send", "content": "' + "x" * 9000 + '"}', "message_too_long"),
        ('{"type": "resume", "after_seq": -1}', "invalid_frame"),
        ("[" * 100000 + "]" * 100000, "frame_too_large"),
    ],
    ids=["non-json", "not-object", "no-type", "unknown-type", "empty", "not-text", "too-long", "bad-resume", "huge"],
)
async def test_bad_frames_get_one_error_and_leave_the_socket_usable(conversation, owner, model, frame, code):
    communicator = await connect(conversation, owner)
    await communicator.connect()
    await communicator.receive_json_from()

    await communicator.send_to(text_data=frame)
    error = await communicator.receive_json_from()
    assert error["type"] == "error" and error["code"] == code and error["detail"]
    assert await sync_to_async(Message.objects.count)() == 0

    await communicator.send_json_to({"type": "send", "content": "still there? [[tokens:3]]"})
    events = await receive_until(communicator, "run.finished")
    assert events[-1]["status"] == "succeeded"
    await communicator.disconnect()


async def test_a_binary_frame_is_refused(conversation, owner):
    communicator = await connect(conversation, owner)
    await communicator.connect()
    await communicator.receive_json_from()
    await communicator.send_to(bytes_data=b"\x00\x01")
    assert (await communicator.receive_json_from())["code"] == "binary_not_supported"
    await communicator.disconnect()


async def test_a_second_message_waits_for_the_running_answer(conversation, owner, model):
    communicator = await connect(conversation, owner)
    await communicator.connect()
    await communicator.receive_json_from()

    await communicator.send_json_to({"type": "send", "content": "long one [[tokens:40]] [[tps:40]]"})
    await receive_until(communicator, "run.started")
    await communicator.send_json_to({"type": "send", "content": "impatient"})
    events = await receive_until(communicator, "error")
    assert events[-1]["code"] == "run_in_progress"
    await receive_until(communicator, "run.finished")
    await communicator.disconnect()
    assert await sync_to_async(Message.objects.filter(content="impatient").count)() == 0


async def test_the_same_client_id_twice_stores_one_message(conversation, owner, model):
    communicator = await connect(conversation, owner)
    await communicator.connect()
    await communicator.receive_json_from()
    frame = {"type": "send", "content": "once [[tokens:3]]", "client_id": "same-id"}
    await communicator.send_json_to(frame)
    await receive_until(communicator, "run.finished")
    await communicator.send_json_to(frame)
    assert await communicator.receive_nothing(timeout=0.5)
    await communicator.disconnect()
    assert await sync_to_async(Run.objects.count)() == 1
    assert await sync_to_async(Message.objects.filter(role="user").count)() == 1


async def test_a_model_that_is_down_fails_the_run_clearly_and_keeps_the_message(conversation, owner, settings):
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    settings.CHORUS_MODEL_TIMEOUT = 2
    communicator = await connect(conversation, owner)
    await communicator.connect()
    await communicator.receive_json_from()

    await communicator.send_json_to({"type": "send", "content": "anyone there?"})
    events = await receive_until(communicator, "run.finished", timeout=60)
    await communicator.disconnect()

    finished = events[-1]
    assert finished["status"] == "failed"
    assert finished["error"]["code"] == "model_unreachable"
    run = await Run.objects.aget(id=finished["run_id"])
    assert (run.status, run.error_code) == ("failed", "model_unreachable")
    assert "could not be reached" in run.error_detail
    assert await sync_to_async(Message.objects.filter(content="anyone there?").exists)()


async def test_resume_replays_exactly_the_events_after_a_seq(conversation, owner, model):
    first = await connect(conversation, owner)
    await first.connect()
    await first.receive_json_from()
    await first.send_json_to({"type": "send", "content": "remember me [[tokens:5]]"})
    live = await receive_until(first, "run.finished")
    await first.disconnect()

    second = await connect(conversation, owner)
    await second.connect()
    hello = await second.receive_json_from()
    assert hello["last_seq"] == live[-1]["seq"] and hello["active_run_id"] is None
    middle = live[len(live) // 2]["seq"]
    await second.send_json_to({"type": "resume", "after_seq": middle})
    replay = [await second.receive_json_from() for _ in range(len(live) - len(live) // 2 - 1)]
    assert await second.receive_nothing(timeout=0.3)
    await second.disconnect()

    assert replay == [e for e in live if e["seq"] > middle], "the same event objects, tokens included"


async def test_resume_after_the_log_is_gone_falls_back_to_the_database(conversation, owner, model):
    first = await connect(conversation, owner)
    await first.connect()
    await first.receive_json_from()
    await first.send_json_to({"type": "send", "content": "remember me [[tokens:5]]"})
    live = await receive_until(first, "run.finished")
    await first.disconnect()
    fanout.backend().logs.clear()

    second = await connect(conversation, owner)
    await second.connect()
    await second.receive_json_from()
    await second.send_json_to({"type": "resume", "after_seq": 0})
    replay = [await second.receive_json_from() for _ in range(5)]  # with the naming's conversation.updated
    assert await second.receive_nothing(timeout=0.3)
    await second.disconnect()

    assert replay == [e for e in live if e["type"] != "token"], "tokens live on in their completed message"


async def test_a_socket_that_floods_frames_is_closed_and_others_are_unaffected(conversation, owner, model):
    from agents_app.web.consumers import CLOSE_TOO_MANY_FRAMES, FRAME_BURST, REPLAY_COST

    flooder, neighbour = await connect(conversation, owner), await connect(conversation, owner)
    for communicator in (flooder, neighbour):
        await communicator.connect()
        await communicator.receive_json_from()

    # Resumes are dearer: a client that keeps asking for the history (and never reads it) runs out first.
    for _ in range(FRAME_BURST // (REPLAY_COST + 1)):  # each is a frame and a replay
        await flooder.send_json_to({"type": "resume", "after_seq": 0})
    await flooder.send_json_to({"type": "resume", "after_seq": 0})
    assert (await flooder.receive_json_from())["code"] == "too_many_resumes"
    for _ in range(FRAME_BURST):
        await flooder.send_json_to({"type": "cancel"})
    codes = []
    while True:
        output = await flooder.receive_output(timeout=5)
        if output["type"] == "websocket.close":
            break
        codes.append(json.loads(output["text"])["code"])
    assert output["code"] == CLOSE_TOO_MANY_FRAMES
    assert codes[-1] == "too_many_frames" and set(codes[:-1]) == {"no_active_run"}

    await neighbour.send_json_to({"type": "send", "content": "still served? [[tokens:3]]"})
    events = await receive_until(neighbour, "run.finished")
    assert events[-1]["status"] == "succeeded"
    await neighbour.disconnect()


async def test_a_send_carries_files_to_the_model_and_refuses_images_to_a_team_without_vision(
    conversation, owner, model, tmp_path, monkeypatch
):
    """Attachments over the socket (issue 19), with the embedded worker and the offline model server: the echo
    lists the files, the model describes the image and names the file, and a team without vision refuses."""
    import io

    from django.core.files.storage import FileSystemStorage
    from django.core.files.uploadedfile import SimpleUploadedFile
    from PIL import Image

    from agents_app.domain import services
    from agents_app.models import Attachment, Team

    monkeypatch.setattr(Attachment._meta.get_field("file"), "storage", FileSystemStorage(location=str(tmp_path)))
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (30, 60, 220)).save(buffer, "PNG")

    def upload_to(target, name, data):
        return services.attachment_create(conversation=target, upload=SimpleUploadedFile(name, data)).payload()

    image = await sync_to_async(upload_to)(conversation, "blue.png", buffer.getvalue())
    notes = await sync_to_async(upload_to)(conversation, "plan.csv", b"step,owner\n1,ada\n")
    communicator = await connect(conversation, owner)
    await communicator.connect()
    await communicator.receive_json_from()
    await communicator.send_json_to({"type": "send", "content": "", "attachments": [image["id"], notes["id"]]})
    events = await receive_until(communicator, "run.finished")
    await communicator.disconnect()
    echo, answer = events[0]["message"], events[-2]["message"]
    assert echo["attachments"] == [image, notes] and echo["content"] == ""
    assert answer["content"].startswith(
        "I see an image of 20×10 pixels, mostly blue (#1e3cdc). I read the attached `plan.csv`."
    )

    critic = await Team.objects.aget(slug="writer-critic")
    other = await sync_to_async(services.conversation_create)(owner=owner, team=critic)
    picture = await sync_to_async(upload_to)(other, "blue.png", buffer.getvalue())
    communicator = await connect(other, owner)
    await communicator.connect()
    await communicator.receive_json_from()
    await communicator.send_json_to({"type": "send", "content": "see?", "attachments": [picture["id"]]})
    refusal = await communicator.receive_json_from()
    await communicator.disconnect()
    assert refusal["type"] == "error" and refusal["code"] == "vision_not_supported"
    assert not await Message.objects.filter(conversation=other).aexists()
