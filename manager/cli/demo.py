"""`manager demo`: the service, the fake ZEGOCLOUD, a worker and a minute of traffic.

Everything runs on 127.0.0.1 with throwaway secrets and (unless DATABASE_URL is
set) a SQLite database in a temporary folder, so a newcomer can watch tasks
start, stop and fail, then explore the API and the dashboard.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from manager.zego.client import make_client

DEMO_APP_ID = 1_000_001
BIN = Path(sys.executable).parent


class Demo:
    def __init__(self, port: int, fake_port: int, say: Callable[[str], None]) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.fake = f"http://127.0.0.1:{fake_port}/"
        self.port, self.fake_port = port, fake_port
        self.say = say
        self.folder = tempfile.mkdtemp(prefix="manager-demo-")
        self.env = {
            "DATABASE_URL": os.environ.get("DATABASE_URL") or f"sqlite:///{self.folder}/demo.db",
            "ZEGO_APP_ID": str(DEMO_APP_ID),
            "ZEGO_SERVER_SECRET": secrets.token_hex(16),
            "ZEGO_CALLBACK_SECRET": secrets.token_hex(16),
            "ZEGO_API_URL": self.fake,
            "SECRET_KEY": secrets.token_hex(16),
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.token = ""

    def manager(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - our own console script, fixed arguments
            [str(BIN / "manager"), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )

    def spawn(self, *args: str) -> None:
        log = open(Path(self.folder) / f"{args[0]}-{len(self.processes)}.log", "wb")  # noqa: SIM115
        self.processes.append(
            subprocess.Popen(  # noqa: S603 - our own console script, fixed arguments
                [str(BIN / "manager"), *args],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def start(self) -> None:
        self.manager("db", "upgrade")
        self.token = self.manager("tokens", "create", "demo").stdout.strip()
        self.spawn("serve", "--port", str(self.port), "--workers", "2")
        self.spawn(
            "fake-zego",
            "--port",
            str(self.fake_port),
            "--callback-url",
            f"{self.base}/callbacks/zego",
        )
        self.spawn("worker")
        _wait_for(f"{self.base}/readyz")
        _wait_for(f"{self.fake}_fake/stats")
        self.say(f"service   {self.base}/  (dashboard; sign in with the token below)")
        self.say(f"fake API  {self.fake}  (ZEGO_API_URL)")
        self.say(f"token     {self.token}")
        self.say(f"logs and database in {self.folder}")

    def traffic(self, tasks: int = 6) -> None:
        client = make_client(self.fake, DEMO_APP_ID, self.env["ZEGO_SERVER_SECRET"])
        ids = [f"demo-{i}" for i in range(1, tasks + 1)]
        self.say(f"\n1. starting {tasks} tasks with StartCloudTranscode (signed, to the fake)")
        for i, task_id in enumerate(ids):
            reply = client.start_cloud_transcode(
                {
                    "TaskId": task_id,
                    "UserId": f"user-{i + 1}",
                    "Sequence": 1,
                    "TranscodeInput": {"StreamId": f"camera-{i + 1}"},
                    "TranscodeOutput": [{"StreamId": f"camera-{i + 1}-720p", "TemplateId": 2}],
                }
            )
            self.say(f"   {task_id}: Code {reply.code} {reply.message}")
        self.show_after(2)

        self.say("\n2. an update of demo-1 (Sequence 2): TranscodeUpdated")
        client.start_cloud_transcode(
            {
                "TaskId": "demo-1",
                "UserId": "user-1",
                "Sequence": 2,
                "TranscodeInput": {"StreamId": "camera-1"},
                "TranscodeOutput": [{"StreamId": "camera-1-1080p", "TemplateId": 3}],
            }
        )
        self.show_after(2)

        self.say("\n3. an operator stops demo-2 through manager (POST /api/tasks/demo-2/stop)")
        response = self.api("post", "/api/tasks/demo-2/stop", json={"reason": "demo"})
        self.say(f"   HTTP {response.status_code}: {response.json()['stop_request']['state']}")
        self.say("\n4. demo-3 fails inside ZEGOCLOUD (transcode_stop with StopReason 1)")
        requests.post(f"{self.fake}_fake/tasks/demo-3/fail", timeout=10)
        self.show_after(3)

        self.say("\n5. a bulk stop of every running task (POST /api/stops), sent by the worker")
        response = self.api("post", "/api/stops", json={"all_running": True, "reason": "demo"})
        batch = response.json()["batch"]
        self.say(f"   batch {batch['id']}: {batch['total']} stop requests for the worker")
        self.show_when_settled(timeout=60)
        summary = self.api("get", "/api/reports/summary")
        if summary.status_code == 200:
            self.say(f"\nsummary report: {summary.json()}")

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return requests.request(method, f"{self.base}{path}", headers=headers, timeout=30, **kwargs)

    def show_after(self, seconds: float) -> None:
        time.sleep(seconds)
        self.show(self.api("get", "/api/tasks").json()["tasks"])

    def show_when_settled(self, timeout: float) -> None:
        """Show the tasks once none is running or stopping (or the timeout is up): the
        worker's stops and the fake's callbacks take longer on a busy machine."""
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(1)
            tasks = self.api("get", "/api/tasks").json()["tasks"]
            settled = all(task["status"] not in ("running", "stopping") for task in tasks)
            if settled or time.monotonic() > deadline:
                self.show(tasks)
                return

    def show(self, tasks: list[dict[str, Any]]) -> None:
        for task in sorted(tasks, key=lambda t: t["task_id"]):
            self.say(
                f"   {task['task_id']:<8} {task['owner']:<8} {task['status']:<9} "
                f"seq={task['sequence']}"
            )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _wait_for(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.2)
