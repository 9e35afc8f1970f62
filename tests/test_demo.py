"""`manager demo` runs the service, the fake and a worker, and walks tasks through."""

from __future__ import annotations

import os
import subprocess

from .live import BIN, free_port


def test_demo_starts_stops_and_fails_tasks() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [
            str(BIN / "manager"),
            "demo",
            "--port",
            str(free_port()),
            "--fake-port",
            str(free_port()),
            "--exit",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "demo-1: Code 0 success" in out
    final = out.split("5. a bulk stop")[1]
    assert "demo-3   user-3   failed" in final
    for task in ("demo-1", "demo-2", "demo-4", "demo-5", "demo-6"):
        assert f"{task}   user-{task[-1]}   stopped" in final
