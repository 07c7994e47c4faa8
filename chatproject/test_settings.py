"""Settings for the test suite: the real settings, with a throwaway key shared with the processes tests start."""

import os
import secrets
import tempfile

# Subprocesses started by integration tests (daphne, workers) inherit this, so they accept the test's
# session cookies. It is made per test run and never stored.
os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
os.environ.setdefault("CHORUS_OFFLINE_MODEL", "1")
# Files tests upload go to a throwaway folder, never var/attachments.
os.environ.setdefault("CHORUS_ATTACHMENT_DIR", tempfile.mkdtemp(prefix="chorus-test-attachments-"))

from chatproject.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests only
# Close each connection after use, so no thread (a socket handler's, a tool's) still holds one when the test
# database is dropped at the end of the run.
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
