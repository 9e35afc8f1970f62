"""The wheel runs on its own: built, installed in a fresh virtualenv outside the checkout,
it upgrades a database and serves, from another directory."""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine

from .live import free_port

ROOT = Path(__file__).resolve().parent.parent
# What a build needs from the checkout; nothing else is copied.
SOURCES = ("pyproject.toml", "README.md", "manager", "migrations")


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    pip = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q")
    run(*pip, "-w", out, source, cwd=source)
    [built] = out.glob("manager-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the wheel; its dependencies are taken from this one's
    site-packages by a path entry (which, unlike a site directory, does not run this
    environment's editable install of manager)."""
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv)
    target = next((venv / "lib").glob("python3*/site-packages"))
    (target / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "-q",
        "--no-deps",
        wheel,
        cwd=venv,
    )
    return venv


def test_the_wheel_carries_every_package_and_the_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "manager").rglob("__init__.py")
    }
    assert on_disk <= set(listed)  # a new package must be listed to ship
    for module in (ROOT / "manager").rglob("*.py"):
        assert str(module.relative_to(ROOT)) in names
    for revision in (ROOT / "migrations" / "versions").glob("0*.py"):
        assert f"manager/migrations/versions/{revision.name}" in names
    assert "manager/migrations/env.py" in names
    assert "manager/migrations/script.py.mako" in names
    for template in (ROOT / "manager" / "web" / "templates").iterdir():
        assert f"manager/web/templates/{template.name}" in names


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory with no checkout in sight."""
    place = tmp_path / "elsewhere"
    place.mkdir()
    return place


def environment(database_url: str, venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DATABASE_URL=database_url, SECRET_KEY="packaging-test")
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return env


@pytest.fixture
def database_url(scratch_engine: Engine) -> str:
    """An empty database of the suite's kind (SQLite, or PostgreSQL in its pass)."""
    return scratch_engine.url.render_as_string(hide_password=False)


def test_the_installed_package_upgrades_and_serves_from_anywhere(
    installed: Path, elsewhere: Path, database_url: str
) -> None:
    manager = installed / "bin" / "manager"
    env = environment(database_url, installed)
    where = run(
        installed / "bin" / "python",
        "-c",
        "import manager; print(manager.__file__)",
        cwd=elsewhere,
        env=env,
    )
    assert str(ROOT) not in where  # the wheel's copy, not the checkout's
    assert "upgraded to head" in run(manager, "db", "upgrade", cwd=elsewhere, env=env)
    assert " head" in run(manager, "db", "current", cwd=elsewhere, env=env)
    port = free_port()
    server = subprocess.Popen(
        [str(manager), "serve", "--port", str(port), "--workers", "1"],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code
                if status == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        assert status == 200, server.stderr.read().decode() if server.poll() is not None else status
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        if server.stderr:
            server.stderr.close()
