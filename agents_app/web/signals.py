"""Signal receivers: sockets and event streams end with their session, at once where Django sends a signal.

Whatever the way a session ends, session_watch.py notices within CHORUS_SESSION_CHECK_SECONDS. These make it
sooner: a logout closes that session's sockets in every tab and every web process (through the session's
group on the channel layer) and its SSE streams in this process; a change to a user (a new password, is_active
turned off) or their deletion has this process check its sessions at once.
"""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from agents_app.web import session_watch

logger = logging.getLogger(__name__)


def session_group(session_key: str) -> str:
    return f"session.{session_key}"


@receiver(user_logged_out)
def close_sockets_of_ended_session(sender, request, user, **kwargs) -> None:
    session_key = getattr(request, "session", None) and request.session.session_key
    if not session_key:
        return
    session_watch.end_soon(session_key)
    try:
        async_to_sync(get_channel_layer().group_send)(session_group(session_key), {"type": "session.ended"})
    except Exception:  # the logout itself must not fail because the channel layer is away
        logger.warning("could not close the sockets of an ended session", exc_info=True)


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def check_sessions_of_a_changed_user(sender, update_fields=None, **kwargs) -> None:
    if update_fields is not None and set(update_fields) <= {"last_login"}:
        return  # every login saves this: nothing that ends a session
    transaction.on_commit(session_watch.check_soon)


@receiver(post_delete, sender=settings.AUTH_USER_MODEL)
def check_sessions_of_a_deleted_user(sender, **kwargs) -> None:
    transaction.on_commit(session_watch.check_soon)
