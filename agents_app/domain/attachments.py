"""Attachments (issue 19): what a file is, judged from its bytes, and what of it the model gets.

Uploaded files are untrusted. Their type is decided here by sniffing the content (Pillow for images, the PDF
header, UTF-8 text), never by their name or the client's Content-Type; SVG, HTML and anything else that is not
one of the kinds below is refused. Knows nothing of HTTP.
"""

import io
import logging
from dataclasses import dataclass
from pathlib import PurePath

from django.conf import settings

logger = logging.getLogger(__name__)

# Images a vision model takes (OpenAI's list), by Pillow's format name.
IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}
# Text files keep a label by their extension, for display; their bytes decided that they are text.
TEXT_TYPES = {".md": "text/markdown", ".markdown": "text/markdown", ".csv": "text/csv", ".json": "application/json"}
TEXT_SNIFF_BYTES = 64 * 1024


class AttachmentRefused(Exception):
    """A file (or a set of files) refused: `code` and `detail` as the protocol's errors carry them."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class Sniffed:
    kind: str  # "image", "text" or "pdf" (models.Attachment.Kind)
    content_type: str
    width: int | None = None
    height: int | None = None


def clean_name(name: str | None) -> str:
    """The person's file name, for display only: no folders, no control characters, at most 255 characters."""
    base = PurePath((name or "").replace("\\", "/")).name
    base = "".join(ch for ch in base if ch.isprintable() and ch not in "\x00")
    return base.strip()[:255] or "file"


def sniff(head: bytes, fileobj, name: str) -> Sniffed:
    """What the file is, from its content. `head` is its first bytes; `fileobj` the whole file (seekable)."""
    if head.startswith(b"%PDF-"):
        return Sniffed("pdf", "application/pdf")
    image = _sniff_image(fileobj)
    if image is not None:
        return image
    if _looks_like_text(head):
        suffix = PurePath(name).suffix.lower()
        return Sniffed("text", TEXT_TYPES.get(suffix, "text/plain"))
    raise AttachmentRefused(
        "unsupported_file_type",
        "Attach images (PNG, JPEG, GIF, WebP), PDFs or text files (plain text, Markdown, CSV, JSON, code).",
    )


def _sniff_image(fileobj) -> Sniffed | None:
    from PIL import Image, UnidentifiedImageError

    fileobj.seek(0)
    try:
        with Image.open(fileobj) as image:  # reads the header only: no pixels are decoded here
            fmt, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    finally:
        fileobj.seek(0)
    if fmt not in IMAGE_TYPES:
        raise AttachmentRefused("unsupported_file_type", f"{fmt} images are not taken: use PNG, JPEG, GIF or WebP.")
    side = settings.CHORUS_ATTACHMENT_MAX_IMAGE_SIDE
    if width > side or height > side or width < 1 or height < 1:
        raise AttachmentRefused(
            "image_too_large", f"Images are limited to {side} by {side} pixels; this one is {width} by {height}."
        )
    try:  # a header that lies about the pixels behind it
        fileobj.seek(0)
        with Image.open(fileobj) as image:
            image.verify()
    except Exception:
        raise AttachmentRefused("invalid_image", "The image is damaged: it could not be read.") from None
    finally:
        fileobj.seek(0)
    return Sniffed("image", IMAGE_TYPES[fmt], width, height)


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the end of the sniffed bytes is still text.
        if exc.start < len(head) - 4:
            return False
    return True


def text_of(*, kind: str, data: bytes, limit: int) -> str:
    """The text a model gets from a text file or a PDF, at most `limit` characters."""
    if kind == "pdf":
        return _pdf_text(data, limit)
    return data.decode("utf-8", errors="replace")[:limit]


def _pdf_text(data: bytes, limit: int) -> str:
    from pypdf import PdfReader

    parts: list[str] = []
    total = 0
    try:
        reader = PdfReader(io.BytesIO(data))
        for page in reader.pages:
            text = page.extract_text() or ""
            parts.append(text)
            total += len(text)
            if total >= limit:
                break
    except Exception:  # a damaged or encrypted PDF: the model is told, the run goes on
        logger.warning("could not read a PDF's text", exc_info=True)
        return "(The PDF's text could not be read.)"
    return "\n".join(parts)[:limit]
