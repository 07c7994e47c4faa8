"""Read-only share links: a conversation anyone with the link can read, until its owner revokes the link.

A link is /share/<id>/<secret>/. The secret is derived from the link's id with the deployment's SECRET_KEY
(salted_hmac), so the database holds nothing that opens a conversation, and a guessed id opens nothing.
"""

from django.utils import timezone
from django.utils.crypto import constant_time_compare, salted_hmac

from agents_app.models import Conversation, ShareLink

SALT = "chorus.share-link"


def share_secret(link_id) -> str:
    return salted_hmac(SALT, str(link_id), algorithm="sha256").hexdigest()[:40]


def share_path(link: ShareLink) -> str:
    return f"/share/{link.id}/{share_secret(link.id)}/"


def share_link_create(*, conversation: Conversation) -> ShareLink:
    return ShareLink.objects.create(conversation=conversation)


def share_link_revoke(*, link: ShareLink) -> None:
    if link.revoked_at is None:
        link.revoked_at = timezone.now()
        ShareLink.objects.filter(id=link.id, revoked_at=None).update(revoked_at=link.revoked_at)


def share_links_for_conversation(*, conversation: Conversation):
    return ShareLink.objects.filter(conversation=conversation, revoked_at=None).order_by("-created_at")


def shared_conversation(*, link_id, secret: str) -> Conversation | None:
    """The conversation a link opens, or None: a wrong secret, a revoked link and no link look the same."""
    if not constant_time_compare(share_secret(link_id), secret or ""):
        return None
    link = ShareLink.objects.select_related("conversation__team").filter(id=link_id, revoked_at=None).first()
    return link.conversation if link is not None else None


def share_link_payload(link: ShareLink) -> dict:
    return {"id": str(link.id), "url": share_path(link), "created_at": link.created_at.isoformat()}
