"""Attachments on their way to the model (issue 19): the runner gives images as image parts and text files as
named text, AutoGen and the streaming request send the images as OpenAI `image_url` data URLs, and the offline
model server answers about what it received (an image's size and dominant colour, the files' names)."""

import io
import json

import pytest
from autogen_agentchat.messages import MultiModalMessage
from autogen_core import Image as AgImage
from PIL import Image

from agents_app.runner import CompletedMessage, ModelSettings, TurnFile, TurnRequest, run_turn, turn_task
from agents_app.teams import HERE

ASSISTANT = json.loads((HERE / "assistant.json").read_text())


def png(width=12, height=8, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_text_files_go_as_named_text_and_images_as_image_parts():
    notes = TurnFile("notes.md", "text/markdown", "text", text="# Notes\nbuy milk")
    plain = turn_task(TurnRequest(team_config={}, task="Summarise", files=(notes,)))
    assert plain == "Summarise\n\nAttached file notes.md (text/markdown):\n~~~~\n# Notes\nbuy milk\n~~~~"
    image = TurnFile("red.png", "image/png", "image", data=png())
    task = turn_task(TurnRequest(team_config={}, task="What is this?", files=(notes, image)))
    assert isinstance(task, MultiModalMessage) and task.source == "user"
    assert task.content[0] == plain.replace("Summarise", "What is this?")
    assert task.content[1] == "Attached image red.png:"
    assert isinstance(task.content[2], AgImage) and task.content[2].image.size == (12, 8)
    cut = TurnFile("big.txt", "text/plain", "text", text="abc", truncated=True)
    assert "big.txt (text/plain) (cut to fit" in turn_task(TurnRequest(team_config={}, task="", files=(cut,)))


@pytest.mark.asyncio
async def test_the_model_sees_the_image_and_reads_the_file(fakellm_url):
    model = ModelSettings(api_key="offline", base_url=fakellm_url)
    files = (
        TurnFile("notes.md", "text/markdown", "text", text="# Notes\nbuy milk"),
        TurnFile("red.png", "image/png", "image", data=png()),
    )
    events = []
    result = await run_turn(TurnRequest(team_config=ASSISTANT, task="What is this?", files=files), model, events.append)
    assert result.status == "succeeded", result.error_detail
    answer = [e for e in events if isinstance(e, CompletedMessage)][0].content
    # The server decoded the image part's data URL with Pillow: the model request carried the image itself.
    assert answer.startswith("I see an image of 12×8 pixels, mostly red (#c81e1e). I read the attached `notes.md`.")
    json.dumps(result.team_state)  # the saved state, image included, is storable JSON


@pytest.mark.asyncio
async def test_autogen_drops_images_for_a_model_without_vision_so_the_send_refuses_them(fakellm_url):
    """AutoGen's AssistantAgent quietly replaces images by a placeholder for a model whose model_info has no
    vision: the reason services.message_send refuses images (vision_not_supported) for such a team."""
    config = json.loads(json.dumps(ASSISTANT).replace('"vision": true', '"vision": false'))
    model = ModelSettings(api_key="offline", base_url=fakellm_url)
    image = TurnFile("red.png", "image/png", "image", data=png())
    events = []
    result = await run_turn(TurnRequest(team_config=config, task="see?", files=(image,)), model, events.append)
    answer = [e for e in events if isinstance(e, CompletedMessage)][0].content
    assert result.status == "succeeded" and "I see an image" not in answer
