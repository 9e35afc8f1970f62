"""The OpenAPI document: one operation for every route and a route for every operation,
valid OpenAPI 3.1, served at /openapi.json; its patterns say what the code accepts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st

from manager.errors import Invalid
from manager.reports.params import parse_silent_for
from manager.web.api import FORCE_PATTERN, FORCE_VALUES
from manager.web.openapi import BEARER, build_document
from manager.web.reports import MAX_SILENT_FOR
from manager.web.schemas import IDENTIFIER_PATTERN
from manager.zego.callbacks import identifier_problem

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Flask answers HEAD and OPTIONS itself; static files are files, not an API.
UNDOCUMENTED_METHODS = {"HEAD", "OPTIONS"}
FLASK_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def is_static(endpoint: str) -> bool:
    return endpoint == "static" or endpoint.endswith(".static")


def routes(app: Flask) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every route but the static files'."""
    return {
        (method.lower(), FLASK_VARIABLE.sub(r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        if not is_static(rule.endpoint)
        for method in (rule.methods or set()) - UNDOCUMENTED_METHODS
    }


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method, path, operation


def schemas(node: Any) -> Iterator[dict[str, Any]]:
    """Every Schema Object in the document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" and isinstance(value, dict):
                yield value
            elif key == "schemas" and isinstance(value, dict):
                yield from value.values()
            else:
                yield from schemas(value)
    elif isinstance(node, list):
        for item in node:
            yield from schemas(item)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


@pytest.fixture
def doc(app: Flask) -> dict[str, Any]:
    return build_document(app)


def test_every_route_has_an_operation_and_every_operation_a_route(
    app: Flask, doc: dict[str, Any]
) -> None:
    documented = {(method, path) for method, path, _ in operations(doc)}
    assert routes(app) - documented == set(), "routes without an operation"
    assert documented - routes(app) == set(), "operations without a route"


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema
    for schema in schemas(doc):  # which leaves Schema Objects to JSON Schema's own
        jsonschema_rs.meta.validate(
            {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        )
    for ref in set(refs(doc)):
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert node, ref
    operation_ids = [operation["operationId"] for _, _, operation in operations(doc)]
    assert len(operation_ids) == len(set(operation_ids))


def test_the_api_asks_for_the_bearer_token_and_nothing_else_does(doc: dict[str, Any]) -> None:
    for method, path, operation in operations(doc):
        where = (method, path)
        assert "413" in operation["responses"], where  # every route has the body cap
        if path.startswith("/api/"):
            assert operation["security"] == [{BEARER: []}], where
            assert "401" in operation["responses"], where
        else:
            assert {BEARER: []} not in operation["security"], where
        if path.startswith("/callbacks/"):
            assert operation["security"] == [], where  # the body's signature instead


def test_errors_have_the_one_shape(doc: dict[str, Any]) -> None:
    components = doc["components"]["responses"]
    for method, path, operation in operations(doc):
        for status, response in operation["responses"].items():
            if "$ref" in response:
                response = components[response["$ref"].rsplit("/", 1)[1]]
            if int(status) < 400 or "application/json" not in response.get("content", {}):
                continue
            schema = response["content"]["application/json"]["schema"]["$ref"]
            expected = "ZegoRefusal" if status == "502" else "Error"
            assert schema == f"#/components/schemas/{expected}", (method, path, status)


def test_served_without_auth(client: FlaskClient, app: Flask) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.json == build_document(app)
    assert response.headers["X-Request-Id"]


def test_the_identifier_pattern_is_the_identifier_rule() -> None:
    pattern = re.compile(IDENTIFIER_PATTERN)
    for code in range(0xD800):  # surrogates cannot come in a URL, nor in a Rust regex
        text = f"a{chr(code)}b"
        assert (pattern.fullmatch(text) is not None) == (identifier_problem(text) is None), code


@given(st.one_of(st.sampled_from(list(FORCE_VALUES)).map(str.upper), st.text(max_size=6)))
def test_the_force_pattern_takes_what_force_takes(raw: str) -> None:
    assert (re.fullmatch(FORCE_PATTERN, raw) is not None) == (raw.lower() in FORCE_VALUES)


def test_silent_for_is_documented_up_to_what_it_takes() -> None:
    assert parse_silent_for(str(MAX_SILENT_FOR)) == MAX_SILENT_FOR
    with pytest.raises(Invalid):
        parse_silent_for(str(MAX_SILENT_FOR + 1))
