"""The dashboard in a real browser: headless Debian Chromium driven by Selenium.

Skipped, saying why, where the browser or Selenium is missing (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.models import Task, TaskRun
from manager.zego.fake_server import FakeServer

from ..conftest import callback

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 15


def _missing() -> str | None:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return (
            f"no browser: {CHROMIUM} or {CHROMEDRIVER} is missing "
            "(apt-get install chromium chromium-driver; .ci/run does this)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1366,768",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never looks for (or downloads) one.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _add_history(db: Session) -> None:
    """Some past runs, so that the chart in the screenshot has something to show."""
    task_pk = db.execute(select(Task.id).where(Task.task_id == "stream-9c01")).scalar_one()
    today = datetime.combine(utcnow().date(), time())
    for n, (days_ago, hour, length) in enumerate(
        [
            (13, 9, 2.0),
            (12, 10, 5.5),
            (10, 8, 3.0),
            (9, 20, 7.0),
            (9, 9, 1.0),
            (7, 11, 4.0),
            (6, 12, 2.5),
            (5, 7, 9.0),
            (5, 13, 1.5),
            (4, 22, 6.0),
            (2, 10, 3.5),
            (1, 9, 8.0),
            (1, 15, 2.0),
            (1, 18, 0.5),
        ]
    ):
        started = today - timedelta(days=days_ago) + timedelta(hours=hour)
        ended = started + timedelta(hours=length)
        db.add(TaskRun(task_pk=task_pk, run_no=100 + n, started_at=started, ended_at=ended))
    db.commit()


def test_sign_in_and_stop_a_task_in_the_browser(
    browser: Any,
    live_url: str,
    token: str,
    fake_zego: FakeServer,
    db: Session,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    tasks = [
        ("stream-7f3a", "host-42", 3),
        ("stream-9c01", "host-17", 5),
        ("lecture-hall-2", "teacher-8", 1),
        ("match-final-cam3", "broadcaster-1", 12),
    ]
    for task_id, owner, seq in tasks:
        body = json.dumps(callback(task_id=task_id, user_id=owner, sequence=seq))
        response = requests.post(
            f"{live_url}/callbacks/zego",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        fake_zego.fake.seed(task_id, owner, sequence=seq, notify=False)
    _add_history(db)

    wait = WebDriverWait(browser, WAIT)
    browser.get(f"{live_url}/")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    running = wait.until(ec.presence_of_element_located((By.ID, "running")))
    assert "stream-7f3a" in running.text
    assert "Signed in as ops-alice" in browser.find_element(By.CSS_SELECTOR, "header").text

    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Stop stream-7f3a']").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "stopping"), "stream-7f3a"))
    assert "stream-7f3a" not in browser.find_element(By.ID, "running").text
    assert "stream-9c01" in browser.find_element(By.ID, "running").text
    flash = browser.find_element(By.CSS_SELECTOR, ".flash.ok").text
    assert "ZEGOCLOUD accepted it (Sequence 4)" in flash
    assert fake_zego.fake.tasks["stream-7f3a"].stops == [4]

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))  # what a 1366x768 laptop shows
    assert shot.stat().st_size > 10_000
    browser.set_window_size(1366, 1300)
    assert browser.save_screenshot(str(tmp_path / "dashboard-full.png"))

    # A task's own page, from its link in the list: its state and every run.
    browser.set_window_size(1366, 768)
    browser.find_element(By.ID, "running").find_element(By.LINK_TEXT, "stream-9c01").click()
    runs = wait.until(ec.presence_of_element_located((By.ID, "runs")))
    assert "stream-9c01" in browser.find_element(By.ID, "task").text
    rows = runs.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 15  # the one going now and the 14 that _add_history numbers after it
    assert rows[0].text.startswith("113 ")  # newest first, by number
    assert "ended unseen" in rows[0].text  # _add_history's runs have no stop_reason
    assert rows[-1].text.startswith("1 host-17 ")
    assert "running" in rows[-1].text
    assert browser.save_screenshot(str(tmp_path / "task.png"))
    print(f"screenshots: {shot}, dashboard-full.png and task.png beside it")


def test_a_subscription_its_delivery_log_and_a_replay_in_the_browser(
    browser: Any,
    live_url: str,
    token: str,
    app: Any,
    db: Session,
    tmp_path: Path,
) -> None:
    """From the navigation to a subscription's page, its log, and the replay button."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from manager.events.secrets import Sealer, new_key
    from manager.events.sender import EventSender
    from manager.events.subscriptions import create_subscription

    from ..events.receiver import Receiver, serve

    key = new_key()
    with serve(Receiver()) as receiver:
        with Session(app.extensions["manager.engine"]) as session:
            made = create_subscription(
                session,
                Sealer((key,)),
                url=receiver.url,
                description="billing",
                now=utcnow(),
            )
            session.commit()
        receiver.secret = made.secret
        for task_id, owner in (("stream-7f3a", "host-42"), ("lecture-hall-2", "teacher-8")):
            body = json.dumps(callback(task_id=task_id, user_id=owner, sequence=1))
            response = requests.post(
                f"{live_url}/callbacks/zego",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=10,
            )
            assert response.status_code == 200, response.text
        sender = EventSender(app.extensions["manager.engine"], Sealer((key,)))
        assert sender.run_once().delivered == 2

    wait = WebDriverWait(browser, WAIT)
    browser.get(f"{live_url}/")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait.until(ec.presence_of_element_located((By.ID, "running")))
    browser.find_element(By.CSS_SELECTOR, "nav.nav").find_element(
        By.LINK_TEXT, "Subscriptions"
    ).click()
    table = wait.until(ec.presence_of_element_located((By.ID, "subscriptions")))
    row = table.find_element(By.CSS_SELECTOR, "tbody tr")
    assert receiver.url in row.text
    assert " 0 2 0 " in f" {row.text} "  # pending, delivered, failed
    assert browser.save_screenshot(str(tmp_path / "subscriptions.png"))

    row.find_element(By.LINK_TEXT, receiver.url).click()
    log = wait.until(ec.presence_of_element_located((By.ID, "sends")))
    assert "task.started" in log.text
    assert "HTTP 204" in log.text
    assert made.secret not in browser.page_source
    since = browser.find_element(By.ID, "since")
    browser.execute_script("arguments[0].value = '2000-01-01T00:00:00'", since)
    browser.find_element(By.CSS_SELECTOR, "#replay button[type=submit]").click()
    flash = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".flash.ok")))
    assert "2 events are pending again for subscription" in flash.text
    assert browser.save_screenshot(str(tmp_path / "subscription.png"))
    print(f"screenshots: {tmp_path / 'subscriptions.png'} and subscription.png beside it")
