"""Readers for the operations settings (Redis URLs, networks, the log format, the metrics directory); each fails
loudly, naming the variable, on a value it cannot use, and never repeats a password in its error."""

import ipaddress
import os
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from django.core.exceptions import ImproperlyConfigured

from chatproject.env import env_list, env_str

REDIS_SCHEMES = ("redis", "rediss", "unix")
# The TLS options a rediss:// URL may carry in its query string (redis-py's own names), and the others Chorus
# accepts there. Anything else is refused: a misspelt option would otherwise be silently ignored.
TLS_OPTIONS = frozenset(
    {"ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
)
OTHER_OPTIONS = frozenset({"db", "socket_timeout", "socket_connect_timeout", "health_check_interval", "password"})
CERT_REQS = ("none", "optional", "required")


def redacted(url: str) -> str:
    """A Redis URL fit for a log line or an error: scheme, host, port and database, without credentials or
    options."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"unix://{parts.path}"
        host = parts.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path or ''}"
    except ValueError:
        return "<an unreadable URL>"


def check_redis_url(name: str, url: str) -> str:
    """`url` if it is a Redis URL Chorus can use, else ImproperlyConfigured naming `name` (no password)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ImproperlyConfigured(f"{name} has a URL that is not a Redis URL: {redacted(url)}") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ImproperlyConfigured(
            f"{name} must hold redis://, rediss:// (TLS) or unix:// URLs, not {parts.scheme or 'no'} scheme "
            f"({redacted(url)})"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ImproperlyConfigured(f"{name} has a Redis URL without a host: {redacted(url)}")
    for option, value in parse_qsl(parts.query, keep_blank_values=True):
        if option in TLS_OPTIONS:
            if parts.scheme != "rediss":
                raise ImproperlyConfigured(f"{name}: {option} is a TLS option; use rediss:// ({redacted(url)})")
            if option == "ssl_cert_reqs" and value.lower() not in CERT_REQS:
                choices = ", ".join(CERT_REQS)
                raise ImproperlyConfigured(f"{name}: ssl_cert_reqs must be one of {choices}, not {value!r}")
            if option in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and not Path(value).is_file():
                raise ImproperlyConfigured(f"{name}: {option}={value} is not a readable file")
            if option == "ssl_ca_path" and not Path(value).is_dir():
                raise ImproperlyConfigured(f"{name}: ssl_ca_path={value} is not a directory")
        elif option not in OTHER_OPTIONS:
            known = ", ".join(sorted(TLS_OPTIONS | OTHER_OPTIONS))
            raise ImproperlyConfigured(f"{name}: unknown Redis URL option {option!r} (known: {known})")
    return url


def redis_urls(name: str, default: list[str]) -> list[str]:
    urls = env_list(name, default)
    for url in urls:
        check_redis_url(name, url)
    if len(set(urls)) != len(urls):
        raise ImproperlyConfigured(f"{name} names the same Redis twice")
    return urls


def networks(name: str, default: list[str]) -> list:
    """IP networks from a comma-separated list (`10.0.0.0/8,192.168.1.7`)."""
    found = []
    for item in env_list(name, default):
        try:
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ImproperlyConfigured(f"{name} must list IP networks such as 10.0.0.0/8, not {item!r}") from None
    return found


def log_format(name: str, debug: bool) -> str:
    value = env_str(name, "text" if debug else "json").lower()
    if value not in ("json", "text"):
        raise ImproperlyConfigured(f"{name} must be json or text, not {value!r}")
    return value


def metrics_dir(var_dir: Path) -> str:
    """PROMETHEUS_MULTIPROC_DIR (default $CHORUS_VAR_DIR/metrics), created if missing, and put in the environment
    before prometheus_client reads it. Every process of one host (or one shared volume) must use the same one."""
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip() or var_dir / "metrics")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImproperlyConfigured(f"PROMETHEUS_MULTIPROC_DIR={path} cannot be created: {exc}") from None
    if not os.access(path, os.W_OK):
        raise ImproperlyConfigured(f"PROMETHEUS_MULTIPROC_DIR={path} is not writable by this process")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return str(path)
