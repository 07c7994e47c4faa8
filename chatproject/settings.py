"""Django settings for Chorus, read from the environment (see .env.example for every variable).

With nothing configured, Chorus runs in development mode: SQLite in var/, an in-memory channel layer with
the agent worker embedded in the web process, and the offline model server (started by scripts/run.sh).
"""

import json
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from chatproject.env import env_bool, env_float, env_int, env_list, env_str
from chatproject.opsenv import check_redis_url, log_format, metrics_dir, networks, redis_urls

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("CHORUS_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
# With DEBUG on, 404 and 500 show Chorus's friendly pages unless this is on: then Django's debug pages.
CHORUS_DEBUG_PAGES = env_bool("CHORUS_DEBUG_PAGES", False)


def _secret_key() -> str:
    key = env_str("DJANGO_SECRET_KEY")
    if key:
        return key
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DEBUG is off")
    # Development only: one random key kept outside the repository, so sessions survive restarts
    # and every local process (web servers, workers) signs with the same key.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    # daphne first: its runserver replaces staticfiles' one (docs/architecture.md, trap 9).
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    # Before channels: its runworker command replaces channels' one (agents_app/management/commands).
    "agents_app",
    "channels",
    # The API's description (agents_app/web/api.py): with the app installed, /api/docs/ serves its own Swagger UI
    # files (no CDN, no inline script: the Content-Security-Policy holds).
    "ninja",
]

MIDDLEWARE = [
    # Outermost: every answer under /api/ is JSON, Django's own error pages included.
    "agents_app.web.middleware.JsonApiErrorsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # `Authorization: Bearer <token>` under /api/: that token's person, with no CSRF check (agents_app/web/tokens.py).
    "agents_app.web.tokens.ApiTokenMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    # With DEBUG on, the friendly 404/500 pages instead of Django's debug pages (agents_app/web/errorpages.py).
    "agents_app.web.errorpages.FriendlyErrorPagesMiddleware",
]

ROOT_URLCONF = "chatproject.urls"
ASGI_APPLICATION = "chatproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "agents_app.web.context_processors.chorus",
            ],
        },
    },
]

# Database: DATABASE_URL (postgres://..., sqlite:///...), default a SQLite file in var/.
DATABASE_URL = env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'chorus.sqlite3'}"
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a database URL Chorus understands: {exc}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # Several processes (web, worker, tests) share the file: wait for locks instead of failing.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    # A file, not :memory:, so live-server and multi-process tests see the same data (docs/architecture.md, trap 10).
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test_chorus.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Channel layer: Redis when REDIS_URL is set (web servers and agent workers as separate processes),
# otherwise one process with an in-memory layer and the agent worker embedded in the web server.
REDIS_URL = env_str("REDIS_URL")
# The conversation fan-out and resume logs spread over these Redis servers by a stable hash of the conversation
# id (agents_app/realtime/fanout.py); empty: REDIS_URL alone. REDIS_URL stays the channel layer's and the workers' own.
REDIS_URLS = redis_urls("REDIS_URLS", [])
REDIS_URL = REDIS_URL or (REDIS_URLS[0] if REDIS_URLS else "")
if REDIS_URL:
    check_redis_url("REDIS_URL", REDIS_URL)
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis's core layer with `send` in one round trip instead of four (channel_layer.py).
            "BACKEND": "chatproject.channel_layer.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 defaults socket_timeout to 5 s, the layer's blocking-pop time: idle
                # receivers would time out and die (docs/architecture.md, trap 1).
                # health_check_interval: a pooled connection idle that long is PINGed before use, so
                # connections left broken by a Redis restart are replaced instead of failing a request.
                # max_connections: redis-py 8 fails a command at once when its pool is exhausted (default 100
                # connections), and every socket joins and leaves its session's group through this pool: 500
                # sockets closing together would fail.
                "hosts": [
                    {"address": REDIS_URL, "socket_timeout": 10, "health_check_interval": 5, "max_connections": 2000}
                ],
                "capacity": env_int("CHORUS_CHANNEL_CAPACITY", 1000, minimum=100),
                "expiry": 60,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
CHORUS_EMBEDDED_WORKER = env_bool("CHORUS_EMBEDDED_WORKER", not REDIS_URL)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "conversation-list"
LOGOUT_REDIRECT_URL = "login"
CHORUS_SIGNUP_ENABLED = env_bool("CHORUS_SIGNUP_ENABLED", True)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
# daphne does not serve static files; the ASGI app does it itself unless a proxy is configured to.
CHORUS_SERVE_STATIC = env_bool("CHORUS_SERVE_STATIC", True)

# Security headers. The page runs no inline script: every script is a static file.
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # the page's JS reads it for API calls
CSRF_FAILURE_VIEW = "agents_app.web.api.csrf_failure"
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
HTTPS = env_bool("CHORUS_HTTPS", False)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = env_int("CHORUS_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("CHORUS_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("CHORUS_HSTS_PRELOAD", False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("CHORUS_BEHIND_PROXY", False) else None
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
    }
}

# The model. With neither OPENAI_API_KEY nor OPENAI_BASE_URL, scripts/run.sh starts the offline model
# server and points OPENAI_BASE_URL at it; the page then says the offline model is answering.
OPENAI_API_KEY = env_str("OPENAI_API_KEY")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL")
OPENAI_MODEL = env_str("OPENAI_MODEL", "chorus-offline")
CHORUS_OFFLINE_MODEL = env_bool("CHORUS_OFFLINE_MODEL", not OPENAI_API_KEY)
CHORUS_MODEL_TIMEOUT = env_float("CHORUS_MODEL_TIMEOUT", 60.0, minimum=1.0)  # one model request
CHORUS_MODEL_MAX_RETRIES = env_int("CHORUS_MODEL_MAX_RETRIES", 2, minimum=0)  # 429 and 5xx, honouring Retry-After


def _model_endpoints() -> dict:
    """CHORUS_MODEL_ENDPOINTS: model servers other than the deployment's that team configs may name, each with
    a key of its own (docs/teams.md#model-endpoints). OPENAI_API_KEY goes only to OPENAI_BASE_URL (or OpenAI)."""
    raw = env_str("CHORUS_MODEL_ENDPOINTS")
    try:
        endpoints = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ImproperlyConfigured(f"CHORUS_MODEL_ENDPOINTS must be JSON: {exc}") from None
    shape = '{"NAME": {"base_url": "http://...", "api_key_env": "ENV_VAR_WITH_ITS_KEY", "model": "..."}}'
    if not isinstance(endpoints, dict):
        raise ImproperlyConfigured(f"CHORUS_MODEL_ENDPOINTS must be a JSON object: {shape}")
    for name, spec in endpoints.items():
        url = spec.get("base_url") if isinstance(spec, dict) else None
        others = [spec.get(key) for key in ("api_key_env", "model")] if url else []
        if not isinstance(url, str) or not url.strip() or not all(v is None or isinstance(v, str) for v in others):
            raise ImproperlyConfigured(f"CHORUS_MODEL_ENDPOINTS[{name!r}] must be like {shape}")
    return endpoints


CHORUS_MODEL_ENDPOINTS = _model_endpoints()
CHORUS_FIRST_TOKEN_TIMEOUT = env_float("CHORUS_FIRST_TOKEN_TIMEOUT", 60.0, minimum=0.1)
CHORUS_RUN_TIMEOUT = env_float("CHORUS_RUN_TIMEOUT", 600.0, minimum=1.0)
CHORUS_TOOL_TIMEOUT_SECONDS = env_float("CHORUS_TOOL_TIMEOUT_SECONDS", 10.0, minimum=0.1)  # one call (runner/tools.py)
# What checks a team config when it is saved (Team.clean): the runner's check, named here so that the domain
# never imports AutoGen (docs/architecture.md).
CHORUS_TEAM_CHECKER = "agents_app.runner.checks.check_stored_team"
# AutoGen's runtime opens an OpenTelemetry span for every message inside a team, even with no tracer
# configured, at a cost in a worker's CPU per answer. Off unless asked for (set it to "false").
os.environ.setdefault("AUTOGEN_DISABLE_RUNTIME_TRACING", "true")

# Limits and timings.
CHORUS_MAX_MESSAGE_CHARS = env_int("CHORUS_MAX_MESSAGE_CHARS", 8000, minimum=1)
CHORUS_MAX_FRAME_BYTES = env_int("CHORUS_MAX_FRAME_BYTES", 64 * 1024, minimum=1024)

# Attachments (docs/api.md): files people give the agents. Stored through Django's storage API: the
# "attachments" storage, local files under var/attachments/ unless CHORUS_ATTACHMENT_STORAGE names another
# backend (for example storages.backends.s3.S3Storage, configured by that backend's own settings).
CHORUS_ATTACHMENT_STORAGE = env_str("CHORUS_ATTACHMENT_STORAGE", "django.core.files.storage.FileSystemStorage")
CHORUS_ATTACHMENT_DIR = Path(env_str("CHORUS_ATTACHMENT_DIR", str(VAR_DIR / "attachments")))
CHORUS_ATTACHMENT_MAX_BYTES = env_int("CHORUS_ATTACHMENT_MAX_BYTES", 10 * 1024 * 1024, minimum=1)  # one file
CHORUS_ATTACHMENTS_MAX_BYTES_PER_MESSAGE = env_int(
    "CHORUS_ATTACHMENTS_MAX_BYTES_PER_MESSAGE", 20 * 1024 * 1024, minimum=1
)
CHORUS_ATTACHMENTS_MAX_PER_MESSAGE = env_int("CHORUS_ATTACHMENTS_MAX_PER_MESSAGE", 5, minimum=1)
# Files uploaded into one conversation and not sent yet: uploads beyond are refused until some are sent or removed.
CHORUS_ATTACHMENTS_MAX_UNSENT = env_int("CHORUS_ATTACHMENTS_MAX_UNSENT", 20, minimum=1)
CHORUS_ATTACHMENT_MAX_IMAGE_SIDE = env_int("CHORUS_ATTACHMENT_MAX_IMAGE_SIDE", 8192, minimum=1)  # pixels, either side
# Characters of text files (and of PDFs' text) a message gives the model, all its files together.
CHORUS_ATTACHMENT_TEXT_BUDGET = env_int("CHORUS_ATTACHMENT_TEXT_BUDGET", 50_000, minimum=1)
_LOCAL_STORAGE = "django.core.files.storage.FileSystemStorage"
STORAGES = {
    "default": {"BACKEND": _LOCAL_STORAGE},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    # Never served by URL from the storage itself: only through the API, to the conversation's owner.
    "attachments": {
        "BACKEND": CHORUS_ATTACHMENT_STORAGE,
        "OPTIONS": {"location": str(CHORUS_ATTACHMENT_DIR), "base_url": None}
        if CHORUS_ATTACHMENT_STORAGE == _LOCAL_STORAGE
        else {},
    },
}
# Answers one worker streams at once. A streaming run spends nearly all its time waiting on the model (a few
# ms of CPU per answer, docs/performance.md), so the cap is high: a burst is admitted at once, and the start
# slots below pace the set-up of the teams. A small cap made people wait for others' answers to finish while
# the worker sat idle.
CHORUS_WORKER_MAX_RUNS = env_int("CHORUS_WORKER_MAX_RUNS", 256, minimum=1)
# Runs one worker sets up at once (until each sends its first request to the model); see worker.StartSlot.
CHORUS_WORKER_START_CONCURRENCY = env_int("CHORUS_WORKER_START_CONCURRENCY", 2, minimum=1)
CHORUS_WORKER_POLL_SECONDS = env_float("CHORUS_WORKER_POLL_SECONDS", 2.0, minimum=0.1)
CHORUS_HEARTBEAT_SECONDS = env_float("CHORUS_HEARTBEAT_SECONDS", 5.0, minimum=0.1)
# A running run whose heartbeat is older than this is taken to be on a dead worker, and recovered.
CHORUS_RUN_STALE_SECONDS = env_float("CHORUS_RUN_STALE_SECONDS", 15.0, minimum=0.5)
# A run taken over this many times (its recovery kept failing) is ended as failed instead.
CHORUS_RUN_MAX_TAKEOVERS = env_int("CHORUS_RUN_MAX_TAKEOVERS", 3, minimum=1)
# A Stop its worker has not carried out after this long is carried out by any other worker (or the next poll).
CHORUS_CANCEL_GRACE_SECONDS = env_float("CHORUS_CANCEL_GRACE_SECONDS", 5.0, minimum=0.5)
CHORUS_WORKER_GRACE_SECONDS = env_float("CHORUS_WORKER_GRACE_SECONDS", 30.0, minimum=0.0)  # on SIGTERM
# A run waiting for the person's answer longer than this is ended (cancelled, `input_timeout`); 0: wait forever.
CHORUS_INPUT_WAIT_MAX_SECONDS = env_float("CHORUS_INPUT_WAIT_MAX_SECONDS", 0.0, minimum=0.0)
CHORUS_RATE_LIMIT_PER_MINUTE = env_int("CHORUS_RATE_LIMIT_PER_MINUTE", 20, minimum=1)  # messages per user
CHORUS_MAX_ACTIVE_RUNS_PER_USER = env_int("CHORUS_MAX_ACTIVE_RUNS_PER_USER", 3, minimum=1)
# Tokens one person's runs may use per UTC day (every model request counts); 0 for no limit. An admin sets
# another budget for one person in their person settings (docs/admin.md#budgets).
CHORUS_DAILY_TOKEN_BUDGET = env_int("CHORUS_DAILY_TOKEN_BUDGET", 0, minimum=0)
# Each web process checks the sessions of its open sockets and SSE streams this often, and ends those whose
# session ended (expired, deleted, password changed, user deactivated): agents_app/web/session_watch.py.
CHORUS_SESSION_CHECK_SECONDS = env_float("CHORUS_SESSION_CHECK_SECONDS", 5.0, minimum=0.1)
CHORUS_TOKEN_COALESCE_MS = env_float("CHORUS_TOKEN_COALESCE_MS", 10.0, minimum=0.0)
# A process's Redis publishes go out at least this far apart: one after a quiet spell at once, the ones that
# follow within the window together (agents_app/realtime/fanout.py, docs/performance-history.md).
CHORUS_PUBLISH_WINDOW_MS = env_float("CHORUS_PUBLISH_WINDOW_MS", 3.0, minimum=0.0)
# Fast paths (agents_app/ops/fastpaths.py, docs/performance.md#fast-paths): each leans on a library's private parts
# to save CPU per token, with the library's own path beside it. Each is on by default, off when its setting says so,
# off for all with CHORUS_FAST_PATHS=0, and off on library versions other than those it was written against.
CHORUS_FAST_PATHS = env_bool("CHORUS_FAST_PATHS", True)
CHORUS_FAST_WIRE = env_bool("CHORUS_FAST_WIRE", True)  # the fan-out's own Redis connections
CHORUS_FAST_FRAMES = env_bool("CHORUS_FAST_FRAMES", True)  # frames written straight to daphne's connection
CHORUS_FAST_DISPATCH = env_bool("CHORUS_FAST_DISPATCH", True)  # consumers' dispatch without a thread hop
CHORUS_FAST_MODEL_STREAM = env_bool("CHORUS_FAST_MODEL_STREAM", True)  # the model's stream read by Chorus
CHORUS_FAST_LAYER_SEND = env_bool("CHORUS_FAST_LAYER_SEND", True)  # the channel layer's send in one round trip

# Operations (docs/operations.md): metrics, readiness, logs.
# /metrics answers loopback and these networks only (comma-separated, e.g. 10.0.0.0/8,192.168.1.7/32).
CHORUS_METRICS_ALLOWED_NETWORKS = networks("CHORUS_METRICS_ALLOWED_NETWORKS", [])
# Every process of a host writes its metrics here and any web server's /metrics reports them all.
PROMETHEUS_MULTIPROC_DIR = metrics_dir(VAR_DIR)
# One JSON object a line (the default when DEBUG is off), or lines for a person at a terminal.
CHORUS_LOG_FORMAT = log_format("CHORUS_LOG_FORMAT", DEBUG)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "agents_app.ops.logs.ContextFilter"}},
    "formatters": {
        "json": {"()": "agents_app.ops.logs.JsonFormatter"},
        "text": {"()": "agents_app.ops.logs.TextFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": CHORUS_LOG_FORMAT, "filters": ["context"]}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "agents_app": {"level": env_str("CHORUS_LOG_LEVEL", "INFO")},
        "django.channels.server": {"level": "INFO"},
    },
}
