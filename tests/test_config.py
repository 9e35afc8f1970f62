"""Settings from the environment and the instance .env file."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager.config import ConfigError, Settings


def test_defaults(tmp_path: Path) -> None:
    s = Settings.from_env({}, instance_path=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path.resolve()}/manager.db"
    assert (s.zego_rate_limit, s.callback_max_age, s.stop_max_attempts) == (100, 300, 8)
    assert s.zego_api_url == "https://rtc-api.zego.im/"
    assert s.zego_app_id is None


def test_secret_key_is_generated_once(tmp_path: Path) -> None:
    first = Settings.from_env({}, instance_path=tmp_path).secret_key
    assert len(first) == 64
    assert Settings.from_env({}, instance_path=tmp_path).secret_key == first
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_values_are_read(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "ZEGO_APP_ID": "4000000000",
            "ZEGO_CALLBACK_SECRET": " new , old ,",
            "ZEGO_API_URL": "http://127.0.0.1:8900",
            "ZEGO_RATE_LIMIT": "50",
            "DATABASE_URL": "postgresql+psycopg://u@h/db",
        },
        instance_path=tmp_path,
    )
    assert s.zego_app_id == 4_000_000_000
    assert s.callback_secrets == ("new", "old")
    assert s.zego_api_url == "http://127.0.0.1:8900/"
    assert s.zego_rate_limit == 50


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ZEGO_APP_ID", "abc"),
        ("ZEGO_APP_ID", "4294967296"),
        ("ZEGO_APP_ID", "-1"),
        ("ZEGO_RATE_LIMIT", "0"),
        ("ZEGO_RATE_LIMIT", "ten"),
        ("CALLBACK_MAX_AGE", "-5"),
        ("STOP_MAX_ATTEMPTS", "1.5"),
        ("ZEGO_API_URL", "ftp://x"),
        ("ZEGO_API_URL", "not a url"),
        ("DATABASE_URL", "mysql://x"),
        ("DATABASE_URL", "postgresql://u@h/db"),
    ],
)
def test_invalid_values_name_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value}, instance_path=tmp_path)
    assert name in str(err.value)


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ZEGO_APP_ID=42\nZEGO_RATE_LIMIT=7\n")
    s = Settings.from_env({"ZEGO_RATE_LIMIT": "9"}, instance_path=tmp_path)
    assert (s.zego_app_id, s.zego_rate_limit) == (42, 9)


def test_unknown_variable_in_dotenv_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ZEGO_APPID=42\n")
    with pytest.raises(ConfigError, match="ZEGO_APPID"):
        Settings.from_env({}, instance_path=tmp_path)


def test_secrets_are_not_in_repr(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "ZEGO_SERVER_SECRET": "srv-secret",
            "ZEGO_CALLBACK_SECRET": "cb-secret",
            "SECRET_KEY": "sk-unique-value",
        },
        instance_path=tmp_path,
    )
    assert "srv-secret" not in repr(s)
    assert "cb-secret" not in repr(s)
    assert "sk-unique-value" not in repr(s)
