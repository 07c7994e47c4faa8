"""Signal receivers: a logout closes that session's sockets in every tab and every web process."""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth.signals import user_logged_out
from django.dispatch import receiver

logger = logging.getLogger(__name__)


def session_group(session_key: str) -> str:
    return f"session.{session_key}"


@receiver(user_logged_out)
def close_sockets_of_ended_session(sender, request, user, **kwargs) -> None:
    session_key = getattr(request, "session", None) and request.session.session_key
    if not session_key:
        return
    try:
        async_to_sync(get_channel_layer().group_send)(session_group(session_key), {"type": "session.ended"})
    except Exception:  # the logout itself must not fail because the channel layer is away
        logger.warning("could not close the sockets of an ended session", exc_info=True)
