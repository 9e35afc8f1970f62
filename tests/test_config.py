"""Settings from the environment and the instance .env file."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from manager.config import ConfigError, Settings, _instance_secret_key


def test_defaults(tmp_path: Path) -> None:
    s = Settings.from_env({}, instance_path=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path.resolve()}/manager.db"
    assert (s.zego_rate_limit, s.callback_max_age, s.stop_max_attempts) == (100, 300, 8)
    assert s.zego_api_url == "https://rtc-api.zego.im/"
    assert s.zego_app_id is None
    assert s.delivery_retention_days == 90
    assert s.log_format is None


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
            "DELIVERY_RETENTION_DAYS": "30",
            "LOG_FORMAT": "Text",
        },
        instance_path=tmp_path,
    )
    assert (s.delivery_retention_days, s.log_format) == (30, "text")
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
        ("ZEGO_APP_ID", "1_000"),
        ("ZEGO_APP_ID", "\u0661\u0662"),  # Arabic-Indic digits, which int() accepts
        ("ZEGO_APP_ID", "+12"),
        ("ZEGO_CALLBACK_SECRET", ","),
        ("ZEGO_CALLBACK_SECRET", " , ,"),
        ("ZEGO_RATE_LIMIT", "0"),
        ("ZEGO_RATE_LIMIT", "ten"),
        ("CALLBACK_MAX_AGE", "-5"),
        ("STOP_MAX_ATTEMPTS", "1.5"),
        ("DELIVERY_RETENTION_DAYS", "0"),
        ("LOG_FORMAT", "xml"),
        ("ZEGO_API_URL", "ftp://x"),
        ("ZEGO_API_URL", "not a url"),
        ("ZEGO_API_URL", "https://exa mple.com"),
        ("ZEGO_API_URL", "https://h:99999/"),
        ("ZEGO_API_URL", "https://h/?Action=x"),
        ("DATABASE_URL", "mysql://x"),
        ("DATABASE_URL", "postgresql://u@h/db"),
        ("DATABASE_URL", "postgres://u@h/db"),
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "sqlite+foo:///x.db"),
        ("DATABASE_URL", "postgresql+psycopg2://u@h/db"),
        ("DATABASE_URL", "postgresql+asyncpg://u@h/db"),
        ("DATABASE_URL", "postgresql+psycopg://u@h:notaport/db"),
        ("DATABASE_URL", "postgresql+psycopg://u@h:99999/db"),
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


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u:hunter2@h:notaport/db",
        "postgresql+psycopg://u:hunter2@h:0/db",
        "postgresql+psycopg2://u:hunter2@h/db",
        "postgresql+asyncpg://u:hunter2@h/db",
        "postgresql://u:hunter2@h/db",
        "mysql://u:hunter2@h/db",
        "u:hunter2@h/db",
    ],
)
def test_invalid_database_url_does_not_echo_the_password(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DATABASE_URL": url}, instance_path=tmp_path)
    assert "DATABASE_URL" in str(err.value)
    assert "hunter2" not in str(err.value)
    # Nor does a traceback: no chained exception (SQLAlchemy's quote the URL) is shown.
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///relative.db",
        "sqlite+pysqlite:////tmp/absolute.db",
        "postgresql+psycopg://u:p%40ss@db.example:6432/manager",
        "postgresql+psycopg://u@[::1]:5432/manager",
        "postgresql+psycopg:///manager?host=/run/postgresql",
    ],
)
def test_supported_database_urls_are_accepted(tmp_path: Path, url: str) -> None:
    assert Settings.from_env({"DATABASE_URL": url}, instance_path=tmp_path).database_url == url


def test_blank_values_mean_unset(tmp_path: Path) -> None:
    s = Settings.from_env(
        {"ZEGO_APP_ID": " ", "ZEGO_CALLBACK_SECRET": "  ", "ZEGO_RATE_LIMIT": ""},
        instance_path=tmp_path,
    )
    assert (s.zego_app_id, s.callback_secrets, s.zego_rate_limit) == (None, (), 100)


def test_surrounding_whitespace_is_ignored_in_numbers(tmp_path: Path) -> None:
    assert Settings.from_env({"ZEGO_APP_ID": " 12 "}, instance_path=tmp_path).zego_app_id == 12


def test_invalid_configuration_leaves_no_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({"ZEGO_RATE_LIMIT": "lots"}, instance_path=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["", "\n", "   \n", "too-short-key\n"])
def test_unusable_key_file_stops_start_up(tmp_path: Path, content: str) -> None:
    # An empty file is what a crash between create and write left behind before.
    key_file = tmp_path / "secret_key"
    key_file.write_text(content)
    with pytest.raises(ConfigError) as err:
        Settings.from_env({}, instance_path=tmp_path)
    assert "SECRET_KEY" in str(err.value)
    assert str(key_file) in str(err.value)
    assert key_file.read_text() == content  # refused, not replaced


def test_unreadable_key_file_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "secret_key").write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        Settings.from_env({}, instance_path=tmp_path)


def test_key_file_that_cannot_be_created_stops_start_up(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "instance"
    not_a_folder.write_text("")
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        Settings.from_env({}, instance_path=not_a_folder)


def test_secret_key_variable_wins_over_a_bad_key_file(tmp_path: Path) -> None:
    (tmp_path / "secret_key").write_text("")
    s = Settings.from_env({"SECRET_KEY": "k" * 40}, instance_path=tmp_path)
    assert s.secret_key == "k" * 40


def test_key_file_is_complete_before_it_has_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[str] = []
    real_link = os.link

    def recording_link(src: Any, dst: Any, **kwargs: Any) -> None:
        published.append(Path(src).read_text())
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", recording_link)
    key = _instance_secret_key(tmp_path)
    assert published == [key]
    assert len(key) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]


def test_start_during_another_start_s_write_gets_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first start pauses between writing its key and publishing it; a second
    # start in that window must neither see an empty file nor keep a different key.
    first_writing = threading.Event()
    second_done = threading.Event()
    real_fsync = os.fsync

    def pausing_fsync(fd: int) -> None:
        if threading.current_thread().name == "first":
            first_writing.set()
            assert second_done.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", pausing_fsync)
    first: list[str] = []
    thread = threading.Thread(
        target=lambda: first.append(_instance_secret_key(tmp_path)), name="first"
    )
    thread.start()
    assert first_writing.wait(10)
    second = _instance_secret_key(tmp_path)
    second_done.set()
    thread.join(10)
    assert first == [second]
    assert len(second) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]


def test_concurrent_first_starts_agree_on_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every start has written its own key before any of them publishes: the race at
    # its widest. Exactly one link wins and all of them return that key.
    starts = 8
    all_written = threading.Barrier(starts, timeout=10)
    real_link = os.link

    def link_after_all_wrote(src: Any, dst: Any, **kwargs: Any) -> None:
        all_written.wait()
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link_after_all_wrote)
    with ThreadPoolExecutor(starts) as pool:
        keys = list(pool.map(lambda _: _instance_secret_key(tmp_path), range(starts)))
    assert len(set(keys)) == 1
    assert len(keys[0]) == 64
    assert (tmp_path / "secret_key").read_text() == keys[0]
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]
