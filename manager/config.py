"""Settings, read once at start-up from the environment and the instance `.env` file."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cryptography.fernet import Fernet
from dotenv import dotenv_values
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from manager.zego.client import DEFAULT_TIMEOUT

# Callbacks are a few hundred bytes; a body this large is refused unread (one route,
# the bulk stop, allows more: manager/web/api.py).
MAX_BODY_BYTES = 64 * 1024
DEFAULT_API_URL = "https://rtc-api.zego.im/"
UINT32_MAX = 2**32 - 1
DEFAULT_RETENTION_DAYS = 90
LOG_FORMATS = ("json", "text")

# Variables this service reads; any other key in the instance `.env` file is a typo.
KNOWN_VARIABLES = frozenset(
    {
        "DATABASE_URL",
        "ZEGO_APP_ID",
        "ZEGO_SERVER_SECRET",
        "ZEGO_CALLBACK_SECRET",
        "ZEGO_API_URL",
        "ZEGO_RATE_LIMIT",
        "CALLBACK_MAX_AGE",
        "STOP_MAX_ATTEMPTS",
        "SECRET_KEY",
        "WEB_CONCURRENCY",
        "PROMETHEUS_MULTIPROC_DIR",
        "DELIVERY_RETENTION_DAYS",
        "LOG_FORMAT",
        "SUBSCRIPTION_KEY",
    }
)


# The SQLAlchemy drivers this service is built and tested for: pysqlite (the stdlib) and
# psycopg 3 (a dependency). manager/db.py and the migrations branch on these two backends;
# any other driver is either not installed (psycopg2, asyncpg) or not supported.
SUPPORTED_DRIVERS = frozenset({"sqlite", "sqlite+pysqlite", "postgresql+psycopg"})

# Where the generated dashboard key is kept, and the least a usable key may hold:
# a generated one is 64 hex characters (256 bits).
KEY_FILE_NAME = "secret_key"
MIN_SECRET_KEY_LENGTH = 32

# The most CALLBACK_MAX_AGE may be, in seconds. manager/rollups.py relies on it: no
# callback older than this can change a run, so the days before are final.
MAX_CALLBACK_MAX_AGE = 86_400 * 7


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    secret_key: str = field(repr=False)
    zego_app_id: int | None = None
    zego_server_secret: str | None = field(default=None, repr=False)
    callback_secrets: tuple[str, ...] = field(default=(), repr=False)
    zego_api_url: str = DEFAULT_API_URL
    zego_rate_limit: int = 100
    callback_max_age: int = 300
    stop_max_attempts: int = 8
    delivery_retention_days: int = DEFAULT_RETENTION_DAYS
    # "json" or "text"; None: the command decides (json under serve and worker, else text
    # on a terminal).
    log_format: str | None = None
    # Fernet keys that seal the subscriptions' signing secrets at rest: the first seals,
    # any opens (SUBSCRIPTION_KEY, comma-separated, so that the key can be rotated).
    subscription_keys: tuple[str, ...] = field(default=(), repr=False)
    # (connect, read) seconds for ZEGOCLOUD API calls; not an environment variable.
    zego_timeout: tuple[float, float] = DEFAULT_TIMEOUT

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        instance_path: str | os.PathLike[str] = "instance",
    ) -> Settings:
        """Build settings from `env` (default: os.environ) over the instance `.env` file."""
        instance = Path(instance_path)
        merged = _read_dotenv(instance / ".env")
        merged.update(os.environ if env is None else env)

        database_url = merged.get("DATABASE_URL") or f"sqlite:///{instance.resolve()}/manager.db"
        _check_database_url(database_url)
        return cls(
            database_url=database_url,
            zego_app_id=_optional_int(merged, "ZEGO_APP_ID", 0, UINT32_MAX),
            zego_server_secret=merged.get("ZEGO_SERVER_SECRET") or None,
            callback_secrets=_callback_secrets(merged),
            zego_api_url=_url(merged, "ZEGO_API_URL", DEFAULT_API_URL),
            zego_rate_limit=_int(merged, "ZEGO_RATE_LIMIT", 100, 1, 100_000),
            callback_max_age=_int(merged, "CALLBACK_MAX_AGE", 300, 1, MAX_CALLBACK_MAX_AGE),
            stop_max_attempts=_int(merged, "STOP_MAX_ATTEMPTS", 8, 1, 1000),
            delivery_retention_days=_int(
                merged, "DELIVERY_RETENTION_DAYS", DEFAULT_RETENTION_DAYS, 1, 36_500
            ),
            log_format=_choice(merged, "LOG_FORMAT", LOG_FORMATS),
            subscription_keys=_fernet_keys(merged, "SUBSCRIPTION_KEY"),
            # Last (arguments are evaluated in order), once every other value has been
            # checked: an invalid configuration should not leave a new key file behind.
            secret_key=merged.get("SECRET_KEY") or _instance_secret_key(instance),
        )

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _read_dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    unknown = sorted(set(values) - KNOWN_VARIABLES)
    if unknown:
        raise ConfigError(f"{path}: unknown variable {unknown[0]}")
    return values


def _check_database_url(raw: str) -> None:
    """Refuse a DATABASE_URL that would fail later, inside SQLAlchemy, with a traceback."""
    # No message here may quote the URL: it usually carries the database password.
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError("DATABASE_URL is not a valid SQLAlchemy URL") from None
    except ValueError:  # from SQLAlchemy's int() of the port, quoting the URL's text
        raise ConfigError("DATABASE_URL is not a valid SQLAlchemy URL: bad port") from None
    _check_driver(url)
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ConfigError(f"DATABASE_URL port must be between 1 and 65535, not {url.port}")


def _check_driver(url: URL) -> None:
    if url.drivername in SUPPORTED_DRIVERS:
        return
    # Plain postgresql:// is refused, not rewritten to psycopg: SQLAlchemy itself reads
    # it as psycopg2, so the same DATABASE_URL would mean another (missing) driver to
    # any other tool that reads it.
    if url.get_backend_name() in ("postgresql", "postgres"):
        raise ConfigError(
            "DATABASE_URL must name the psycopg 3 driver: postgresql+psycopg://, "
            f"not {url.drivername}://"
        )
    raise ConfigError(
        f"DATABASE_URL must be a sqlite:// or postgresql+psycopg:// URL, not {url.drivername}://"
    )


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = _optional_int(env, name, low, high)
    return default if value is None else value


def _optional_int(env: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    # int() would also take "1_000" and other scripts' digits ("١٢"); a value that
    # only Python reads as a number is a typo, not a setting.
    if not (raw.isascii() and raw.isdigit()):
        raise ConfigError(f"{name} must be a whole number written with digits 0-9, not {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return raw


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{name} must be an http(s) URL")
    if any(c.isspace() for c in raw):
        raise ConfigError(f"{name} must not contain spaces")
    if parsed.query or parsed.fragment:
        # The client appends ?Action=...; a query of its own would be garbled.
        raise ConfigError(f"{name} must not have a query string or fragment")
    try:
        parsed.port  # noqa: B018 - it raises on a port outside 0-65535
    except ValueError:
        raise ConfigError(f"{name} has an invalid port") from None
    return raw if raw.endswith("/") else raw + "/"


def _callback_secrets(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("ZEGO_CALLBACK_SECRET", "")
    found = tuple(s.strip() for s in raw.split(",") if s.strip())
    # Blank means unset, as for every other variable; separators alone are a mistake
    # (a secret lost in templating, say) that would otherwise refuse every callback.
    if raw.strip() and not found:
        raise ConfigError("ZEGO_CALLBACK_SECRET is set but lists no secret")
    return found


def _fernet_keys(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, "")
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if raw.strip() and not keys:
        raise ConfigError(f"{name} is set but lists no key")
    for key in keys:
        try:
            Fernet(key)
        except (ValueError, TypeError):
            # Not quoted: it is a secret.
            raise ConfigError(
                f"{name} must be Fernet keys (32 url-safe base64-encoded bytes each, as"
                " `manager subscriptions new-key` prints), comma-separated"
            ) from None
    return keys


def _instance_secret_key(instance: Path) -> str:
    """Generate the dashboard's cookie key once and keep it in the instance folder."""
    path = instance / KEY_FILE_NAME
    if not path.exists():
        try:
            _publish_new_key(path)
        except OSError as exc:
            raise ConfigError(
                f"SECRET_KEY is not set and {path} cannot be created ({exc}); set SECRET_KEY"
            ) from None
    # Every process returns what the file holds, so concurrent first starts (one per
    # gunicorn worker) agree on the key whichever of them published it.
    return _read_key_file(path)


def _publish_new_key(path: Path) -> None:
    """Write a new key to `path` unless another process has already published one."""
    # The key is written in full under a temporary name and only then linked to the
    # final name, so a reader never sees an empty or partial file. os.link fails if
    # the name exists: the first process to link wins and the others keep its key.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
            fh.flush()
            # On disk before the name is: a crash must not publish an empty file.
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)


def _read_key_file(path: Path) -> str:
    # A bad file is refused, not replaced: two workers replacing it at once would
    # each keep a different key, and the file may be one an operator put there.
    # Deleting it (a new key is generated) or setting SECRET_KEY is their decision.
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"SECRET_KEY is not set and {path} cannot be read ({exc})") from None
    if len(key) < MIN_SECRET_KEY_LENGTH:
        raise ConfigError(
            f"SECRET_KEY is not set and {path} holds no usable key (fewer than "
            f"{MIN_SECRET_KEY_LENGTH} characters): delete the file to generate a new "
            "key, or set SECRET_KEY"
        )
    return key
