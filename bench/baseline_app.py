"""Baseline for bench/callbacks.py: a Flask endpoint doing exactly one INSERT of the raw body.

Served by gunicorn, e.g.

    BENCH_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/DB \
        .venv/bin/gunicorn -w 4 -b 127.0.0.1:8001 --chdir bench baseline_app:app

The table `baseline_bodies` must exist (bench/callbacks.py creates it: BASELINE_DDL).
"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify, request
from sqlalchemy import create_engine, text

INSERT = text("INSERT INTO baseline_bodies (raw_body) VALUES (:raw_body)")

app = Flask(__name__)
# A pooled engine per worker process; gunicorn forks before the first connection.
engine = create_engine(os.environ["BENCH_DATABASE_URL"], pool_size=5, max_overflow=10)


@app.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@app.post("/ingest")
def ingest() -> tuple[Response, int]:
    raw = request.get_data()
    with engine.begin() as conn:
        conn.execute(INSERT, {"raw_body": raw})
    return jsonify({"code": 0}), 200
