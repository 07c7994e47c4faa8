"""Attachments (issue 19): the upload route, its limits (each refused before anything is stored), who may see a
file, sending files with a message, and their end with their conversation."""

import io
import json

import pytest
from django.core.files.storage import FileSystemStorage
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from agents_app.domain import services
from agents_app.models import Attachment, Message, Team
from agents_app.web import tokens

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def storage(tmp_path, monkeypatch):
    """Each test's files in a folder of its own, so a test sees exactly what it stored."""
    field = Attachment._meta.get_field("file")
    folder = tmp_path / "attachments"
    monkeypatch.setattr(field, "storage", FileSystemStorage(location=str(folder)))
    return folder


def stored(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def png(width=12, height=8, colour=(200, 30, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, fmt)
    return buffer.getvalue()


def upload(client, conversation, name, data, content_type="application/octet-stream"):
    return client.post(
        f"/api/conversations/{conversation.id}/attachments/",
        {"file": SimpleUploadedFile(name, data, content_type=content_type)},
    )


def test_it_stores_an_image_and_describes_it(api, conversation, storage):
    response = upload(api, conversation, "red.png", png())
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {"id", "name", "content_type", "size", "url"}
    assert (body["name"], body["content_type"], body["size"]) == ("red.png", "image/png", len(png()))
    assert body["url"] == f"/api/conversations/{conversation.id}/attachments/{body['id']}/"
    attachment = Attachment.objects.get(id=body["id"])
    assert (attachment.kind, attachment.width, attachment.height, attachment.message_id) == ("image", 12, 8, None)
    assert [p.read_bytes() for p in stored(storage)] == [png()]


def test_it_decides_the_type_by_content_not_by_name(api, conversation):
    as_text = upload(api, conversation, "photo.png", b"just some words\n", content_type="image/png")
    assert as_text.status_code == 201 and as_text.json()["content_type"] == "text/plain"
    as_image = upload(api, conversation, "notes.txt", png(), content_type="text/plain")
    assert as_image.json()["content_type"] == "image/png"
    csv = upload(api, conversation, "table.csv", b"a,b\n1,2\n")
    assert csv.json()["content_type"] == "text/csv"
    pdf = upload(api, conversation, "doc", b"%PDF-1.4\n%%EOF\n")
    assert pdf.json()["content_type"] == "application/pdf"


@pytest.mark.parametrize(
    ("name", "data", "code", "status"),
    [
        ("program.exe", b"MZ\x90\x00\x03\x00\x00\x00\x04\x00", "unsupported_file_type", 400),
        ("pic.bmp", None, "unsupported_file_type", 400),
        ("empty.txt", b"", "empty_file", 400),
        ("big.txt", b"x" * 2001, "file_too_large", 413),
        ("huge.png", "wide", "image_too_large", 413),
        ("broken.png", "cut", "invalid_image", 400),
    ],
)
def test_it_refuses_a_bad_file_before_storing_it(api, conversation, settings, storage, name, data, code, status):
    settings.CHORUS_ATTACHMENT_MAX_BYTES = 2000
    settings.CHORUS_ATTACHMENT_MAX_IMAGE_SIDE = 100
    if data is None:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, "BMP")
        data = buffer.getvalue()
    elif data == "wide":
        data = png(width=101, height=5)
    elif data == "cut":
        data = png(width=50, height=50, colour=(1, 2, 3))[:-30]
    response = upload(api, conversation, name, data)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert not Attachment.objects.exists() and stored(storage) == []


def test_it_refuses_a_body_far_over_the_limit_unread(api, conversation, settings, storage):
    settings.CHORUS_ATTACHMENT_MAX_BYTES = 1000
    response = upload(api, conversation, "big.txt", b"y" * 200_000)
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    assert stored(storage) == []


def test_it_wants_the_field_named_file(api, conversation):
    response = api.post(
        f"/api/conversations/{conversation.id}/attachments/", {"other": SimpleUploadedFile("a.txt", b"hi")}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_body"


def test_it_refuses_a_read_only_token_and_a_stranger(client, owner, other_user, conversation, storage):
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {tokens.token_create(user=owner, name='ro', read_only=True)[1]}"
    refused = upload(client, conversation, "a.txt", b"hello")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "read_only_token"
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {tokens.token_create(user=other_user, name='x')[1]}"
    stranger = upload(client, conversation, "a.txt", b"hello")
    assert stranger.status_code == 404
    del client.defaults["HTTP_AUTHORIZATION"]
    anonymous = upload(client, conversation, "a.txt", b"hello")
    assert anonymous.status_code == 401
    assert stored(storage) == []


def test_a_session_upload_needs_the_csrf_token(owner, conversation):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)
    refused = upload(browser, conversation, "a.txt", b"hello")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    browser.get("/")  # sets the csrftoken cookie
    token = browser.cookies["csrftoken"].value
    accepted = browser.post(
        f"/api/conversations/{conversation.id}/attachments/",
        {"file": SimpleUploadedFile("a.txt", b"hello")},
        HTTP_X_CSRFTOKEN=token,
    )
    assert accepted.status_code == 201, accepted.content


def test_only_the_owner_and_staff_download_it(client, api, owner, other_user, staff, conversation):
    image = upload(api, conversation, "red.png", png()).json()
    text = upload(api, conversation, "<b>page</b>.html", b"<html><script>alert(1)</script></html>").json()
    got = api.get(image["url"])
    assert got.status_code == 200 and b"".join(got.streaming_content) == png()
    assert got["Content-Type"] == "image/png" and got["X-Content-Type-Options"] == "nosniff"
    assert not got.get("Content-Disposition", "").startswith("attachment")
    page = api.get(text["url"])
    assert page["Content-Type"] == "application/octet-stream" and page["Content-Disposition"].startswith("attachment")
    assert page["X-Content-Type-Options"] == "nosniff" and "sandbox" in page["Content-Security-Policy"]
    client.defaults.pop("HTTP_AUTHORIZATION")
    client.force_login(other_user)
    missing = client.get(image["url"])
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    client.force_login(staff)
    assert client.get(image["url"]).status_code == 200


def send(client, conversation, **body):
    return client.post(
        f"/api/conversations/{conversation.id}/messages/", json.dumps(body), content_type="application/json"
    )


def test_a_message_carries_its_files(api, conversation):
    image = upload(api, conversation, "red.png", png()).json()
    notes = upload(api, conversation, "notes.md", b"# Notes\nbuy milk\n").json()
    sent = send(api, conversation, content="Look at these", attachments=[image["id"], notes["id"]])
    assert sent.status_code == 201, sent.content
    assert sent.json()["message"]["attachments"] == [image, notes]
    listed = api.get(f"/api/conversations/{conversation.id}/messages/").json()
    assert listed[0]["attachments"] == [image, notes]
    again = send(api, conversation, content="once more", attachments=[notes["id"]])
    assert again.status_code == 400 and again.json()["error"]["code"] == "unknown_attachment"


def test_a_message_may_be_only_files(api, conversation):
    notes = upload(api, conversation, "notes.txt", b"hello").json()
    sent = send(api, conversation, content="", attachments=[notes["id"]])
    assert sent.status_code == 201 and sent.json()["message"]["content"] == ""
    conversation.refresh_from_db()
    assert conversation.title == "notes.txt"


def test_it_refuses_another_conversations_file(api, owner, team, conversation):
    elsewhere = services.conversation_create(owner=owner, team=team)
    theirs = upload(api, elsewhere, "a.txt", b"hello").json()
    refused = send(api, conversation, content="hi", attachments=[theirs["id"]])
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unknown_attachment"
    assert not Message.objects.filter(conversation=conversation).exists()


def test_it_refuses_too_many_or_too_much(api, conversation, settings):
    ids = [upload(api, conversation, f"{i}.txt", b"x" * 100).json()["id"] for i in range(3)]
    settings.CHORUS_ATTACHMENTS_MAX_PER_MESSAGE = 2
    many = send(api, conversation, content="hi", attachments=ids)
    assert many.json()["error"]["code"] == "too_many_attachments"
    settings.CHORUS_ATTACHMENTS_MAX_BYTES_PER_MESSAGE = 150
    much = send(api, conversation, content="hi", attachments=ids[:2])
    assert much.status_code == 400 and much.json()["error"]["code"] == "attachments_too_large"
    assert not Message.objects.exists() and not Attachment.objects.filter(message__isnull=False).exists()


def test_a_team_without_vision_refuses_images_but_takes_text(api, owner):
    critic = Team.objects.get(slug="writer-critic")
    conversation = services.conversation_create(owner=owner, team=critic)
    image = upload(api, conversation, "red.png", png()).json()
    refused = send(api, conversation, content="what is it?", attachments=[image["id"]])
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "vision_not_supported"
    text = upload(api, conversation, "a.txt", b"hello").json()
    assert send(api, conversation, content="read it", attachments=[text["id"]]).status_code == 201


def test_the_shipped_assistant_sees_images(team):
    assert services.team_sees_images(team)
    assert not services.team_sees_images(Team.objects.get(slug="research-desk"))


def test_deleting_the_conversation_deletes_its_files(api, conversation, storage, django_capture_on_commit_callbacks):
    upload(api, conversation, "red.png", png())
    notes = upload(api, conversation, "notes.txt", b"hello").json()
    send(api, conversation, content="hi", attachments=[notes["id"]])
    from agents_app.models import Run

    Run.objects.filter(conversation=conversation).update(status=Run.Status.SUCCEEDED)
    assert len(stored(storage)) == 2
    with django_capture_on_commit_callbacks(execute=True):
        response = api.delete(f"/api/conversations/{conversation.id}/")
    assert response.status_code == 204
    assert stored(storage) == [] and not Attachment.objects.exists()


def pdf(text: str) -> bytes:
    """A one-page PDF whose page shows `text` (enough for a PDF library to find it)."""
    content = f"BT /F1 12 Tf 10 50 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 100] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_the_worker_gives_the_model_images_and_text_within_the_budget(api, conversation, settings):
    from agents_app.worker.agent import turn_files

    ids = [
        upload(api, conversation, "red.png", png()).json()["id"],
        upload(api, conversation, "report.pdf", pdf("Quarterly totals rose")).json()["id"],
        upload(api, conversation, "long.txt", b"z" * 500).json()["id"],
    ]
    message_id = send(api, conversation, content="see", attachments=ids).json()["message"]["id"]
    settings.CHORUS_ATTACHMENT_TEXT_BUDGET = 100
    image, report, long = turn_files(message_id)
    assert (image.kind, image.data, image.content_type) == ("image", png(), "image/png")
    assert (report.kind, report.name, report.truncated) == ("text", "report.pdf", False)
    assert "Quarterly totals rose" in report.text
    assert long.truncated and len(report.text) + len(long.text) == 100


def test_the_admin_transcript_and_the_exports_show_the_files(client, api, staff, conversation):
    from django.urls import reverse

    from agents_app.domain import export

    notes = upload(api, conversation, "notes.md", b"# Notes\n").json()
    send(api, conversation, content="read this", attachments=[notes["id"]])
    client.force_login(staff)
    page = client.get(reverse("admin:agents_app_conversation_change", args=[conversation.id])).content.decode()
    assert f'<a href="{notes["url"]}" download="notes.md">notes.md</a> · text/markdown' in page
    [exported] = export.export_json()["conversations"]
    assert exported["messages"][0]["attachments"] == [{**notes, "kind": "text", "width": None, "height": None}]
    assert "- Attached: notes.md (text/markdown, 8 bytes)" in export.export_markdown()


def test_an_unsent_file_can_be_removed_a_sent_one_stays(api, conversation, storage, django_capture_on_commit_callbacks):
    kept = upload(api, conversation, "kept.txt", b"kept").json()
    dropped = upload(api, conversation, "dropped.txt", b"dropped").json()
    send(api, conversation, content="hi", attachments=[kept["id"]])
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(dropped["url"]).status_code == 204
    refused = api.delete(kept["url"])
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "attachment_sent"
    assert [p.read_bytes() for p in stored(storage)] == [b"kept"]


def test_unsent_files_are_capped_per_conversation(api, conversation, settings, storage):
    settings.CHORUS_ATTACHMENTS_MAX_UNSENT = 2
    for i in range(2):
        assert upload(api, conversation, f"{i}.txt", b"x").status_code == 201
    refused = upload(api, conversation, "2.txt", b"x")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "too_many_unsent_attachments"
    assert len(stored(storage)) == 2
