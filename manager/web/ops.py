"""Service endpoints for load balancers, Prometheus and API clients; no auth."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

from manager.metrics import render
from manager.migrate import is_at_head
from manager.services import get_session
from manager.web.errors import error_response
from manager.web.gauges import database_gauges
from manager.web.openapi import document, documented, json_answer

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
@documented(
    "The process is up",
    responses={200: json_answer("Up.", "Health")},
)
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@documented(
    "The database is reachable and its schema at the latest migration",
    responses={
        200: json_answer("Ready.", "Ready"),
        503: json_answer(
            "database_unavailable, or migrations_pending: not ready for traffic.", "Error"
        ),
    },
)
def readyz() -> tuple[Response, int]:
    engine = current_app.extensions["manager.engine"]
    try:
        at_head = is_at_head(engine)
    except SQLAlchemyError:
        return error_response(503, "database_unavailable", "the database cannot be reached")
    if not at_head:
        return error_response(503, "migrations_pending", "the schema is not at the latest revision")
    return jsonify({"status": "ready"}), 200


@bp.get("/metrics")
@documented(
    "Prometheus metrics",
    responses={
        200: {
            "description": "The Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def metrics() -> Response:
    try:
        gauges = database_gauges(get_session())
    except SQLAlchemyError:  # the process's own series still tell something
        get_session().rollback()
        gauges = []
    body, content_type = render(gauges)
    return Response(body, content_type=content_type)


@bp.get("/openapi.json")
@documented(
    "This OpenAPI 3.1 document",
    responses={200: json_answer("The document.", "OpenApi")},
)
def openapi() -> Response:
    return Response(json.dumps(document(current_app)), mimetype="application/json")
