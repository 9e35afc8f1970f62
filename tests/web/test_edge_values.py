"""Values at the edges of what a URL can carry, as schemathesis sends them: ids and
cursors beyond what the columns hold, methods a route does not take."""

from __future__ import annotations

import base64

from flask.testing import FlaskClient


def test_a_batch_id_no_batch_can_have_is_404_not_a_database_error(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    for batch_id in ("0", str(2**31), str(10**20)):
        response = client.get(f"/api/stops/{batch_id}", headers=auth)
        assert response.status_code == 404, (batch_id, response.json)
        assert response.json["error"]["code"] == "not_found"


def test_a_task_cursor_beyond_any_task_id_is_400_not_a_database_error(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    forged = base64.urlsafe_b64encode(str(2**31).encode()).decode().rstrip("=")
    response = client.get(f"/api/tasks?cursor={forged}", headers=auth)
    assert response.status_code == 400
    assert response.json["error"] == {
        "code": "invalid_parameter",
        "message": "cursor is not one this API issued",
    }
    last = base64.urlsafe_b64encode(str(2**31 - 1).encode()).decode().rstrip("=")
    assert client.get(f"/api/tasks?cursor={last}", headers=auth).status_code == 200


def test_a_method_a_route_does_not_take_is_405_with_allow(client: FlaskClient) -> None:
    for method, path in (("TRACE", "/healthz"), ("DELETE", "/api/tasks"), ("GET", "/stop")):
        response = client.open(path, method=method)
        assert response.status_code == 405, (method, path)
        assert response.json["error"]["code"] == "method_not_allowed"
        assert method not in response.headers["Allow"]
        assert response.headers["Allow"], (method, path)
