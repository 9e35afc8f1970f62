"""Service endpoints for load balancers and Prometheus; no auth."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

from manager.metrics import render
from manager.migrate import is_at_head
from manager.services import get_session
from manager.web.errors import error_response
from manager.web.gauges import database_gauges

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
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
def metrics() -> Response:
    try:
        gauges = database_gauges(get_session())
    except SQLAlchemyError:  # the process's own series still tell something
        get_session().rollback()
        gauges = []
    body, content_type = render(gauges)
    return Response(body, content_type=content_type)
