"""Django loads an app's models from `<app>.models`: Chorus's live in agents_app/domain/models.py."""

from agents_app.domain.models import *  # noqa: F403

# Migration 0012 names these by this module's path.
from agents_app.domain.models import (  # noqa: F401, E402
    __all__,  # noqa: F401
    _attachment_path,
    _attachment_storage,
)
