"""Settings, read once at start-up from the environment and the instance `.env` file."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dotenv import dotenv_values

from .zego.client import DEFAULT_TIMEOUT

DEFAULT_API_URL = "https://rtc-api.zego.im/"
UINT32_MAX = 2**32 - 1

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
    }
)


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
            secret_key=merged.get("SECRET_KEY") or _instance_secret_key(instance),
            zego_app_id=_optional_int(merged, "ZEGO_APP_ID", 0, UINT32_MAX),
            zego_server_secret=merged.get("ZEGO_SERVER_SECRET") or None,
            callback_secrets=_secret_list(merged.get("ZEGO_CALLBACK_SECRET", "")),
            zego_api_url=_url(merged, "ZEGO_API_URL", DEFAULT_API_URL),
            zego_rate_limit=_int(merged, "ZEGO_RATE_LIMIT", 100, 1, 100_000),
            callback_max_age=_int(merged, "CALLBACK_MAX_AGE", 300, 1, MAX_CALLBACK_MAX_AGE),
            stop_max_attempts=_int(merged, "STOP_MAX_ATTEMPTS", 8, 1, 1000),
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


def _check_database_url(url: str) -> None:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
        raise ConfigError("DATABASE_URL must be a sqlite:// or postgresql+psycopg:// URL")
    if scheme in ("postgresql", "postgres"):
        raise ConfigError("DATABASE_URL must name the psycopg 3 driver: postgresql+psycopg://")


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = _optional_int(env, name, low, high)
    return default if value is None else value


def _optional_int(env: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}")
    return value


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{name} must be an http(s) URL")
    return raw if raw.endswith("/") else raw + "/"


def _secret_list(raw: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in raw.split(",") if s.strip())


def _instance_secret_key(instance: Path) -> str:
    """Generate the dashboard's cookie key once and keep it in the instance folder."""
    path = instance / "secret_key"
    if path.is_file():
        return path.read_text().strip()
    instance.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker process won the race
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key
