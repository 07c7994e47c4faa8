"""Template context shared by every page."""

from django.conf import settings


def chorus(request) -> dict:
    return {
        "offline_model": settings.CHORUS_OFFLINE_MODEL,
        "signup_enabled": settings.CHORUS_SIGNUP_ENABLED,
    }
