"""The OpenAPI 3.1 document of every HTTP endpoint, served at GET /openapi.json.

Each view states its operation with `documented`, beside the code that answers it: a
summary, its parameters and body, and what it answers. `build_document` walks the app's
views with apispec's FlaskPlugin, which reads each view's path from its URL rule; the
path parameters follow from the rule's converters, the bearer-token security and its
401 from `require_token`, and the 413 from the body cap every route has
(manager/web/edges.py). The bodies' schemas are manager/web/schemas.py.

tests/web/test_openapi.py holds the document to the routes, and
tests/web/test_schemathesis.py the running service to the document.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

from apispec import APISpec
from apispec_webframeworks.flask import FlaskPlugin
from flask import Flask
from werkzeug.routing import Rule
from werkzeug.routing.converters import (
    AnyConverter,
    BaseConverter,
    IntegerConverter,
    NumberConverter,
    PathConverter,
)

from manager.config import MAX_BODY_BYTES
from manager.params import EARLIEST, LATEST
from manager.web.auth import GUARD_MARK
from manager.web.edges import REQUEST_ID
from manager.web.schemas import COMPONENTS, IDENTIFIER_PATTERN, Schema

F = TypeVar("F", bound=Callable[..., Any])
# A response: inline, or the name of one of RESPONSES.
Answer = dict[str, Any] | str

OPERATION = "openapi_operation"  # the attribute `documented` puts on a view
EXTENSION = "manager.openapi"  # the app.extensions key of the built document
IGNORED_METHODS = frozenset({"HEAD", "OPTIONS"})  # Flask answers these by itself
BEARER = "bearerToken"
SESSION = "sessionCookie"


@dataclass(frozen=True)
class Operation:
    """What `documented` records: the parts of an OpenAPI operation a view states."""

    summary: str
    responses: Mapping[int, Answer]
    description: str | None = None
    parameters: Sequence[dict[str, Any]] = ()
    body: dict[str, Any] | None = None
    security: list[dict[str, list[str]]] | None = None
    path_parameters: Mapping[str, dict[str, Any]] = field(default_factory=dict)


def documented(
    summary: str,
    *,
    responses: Mapping[int, Answer],
    description: str | None = None,
    parameters: Sequence[dict[str, Any]] = (),
    body: dict[str, Any] | None = None,
    security: list[dict[str, list[str]]] | None = None,
    path_parameters: Mapping[str, dict[str, Any]] | None = None,
) -> Callable[[F], F]:
    """Attach the view's operation for the OpenAPI document.

    `path_parameters` adds to the rule's variables (a description; a schema narrower
    than the one their converter matches). `security` is for views without
    `require_token`, whose security is the bearer token; none by default. Every
    operation may also answer 413 (the body cap).
    """
    operation = Operation(
        summary=summary,
        responses=responses,
        description=description,
        parameters=parameters,
        body=body,
        security=security,
        path_parameters=path_parameters or {},
    )

    def attach(view: F) -> F:
        setattr(view, OPERATION, operation)
        return view

    return attach


# -- building blocks for the views ----------------------------------------------------------


def json_answer(description: str, schema: str | Schema) -> dict[str, Any]:
    """A JSON answer; `schema` names one of manager/web/schemas.py COMPONENTS."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def html_answer(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"text/html": {"schema": {"type": "string"}}},
    }


def redirect_answer(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {
            "Location": {"schema": {"type": "string"}, "required": True},
        },
    }


def json_body(schema: str, *, required: bool, description: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "required": required,
        "content": {"application/json": {"schema": schema}},
    }
    if description:
        body["description"] = description
    return body


def form_body(fields: Mapping[str, str], required: Sequence[str]) -> dict[str, Any]:
    """A form of text fields, each with its description."""
    schema = {
        "type": "object",
        "properties": {
            name: {"type": "string", "description": text} for name, text in fields.items()
        },
        "required": list(required),
    }
    return {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": schema}}}


def query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"in": "query", "name": name, "schema": schema, "description": description}


def or_empty(schema: Schema) -> Schema:
    """A query parameter's schema that also takes an empty value, which the API reads as
    the parameter left out (manager/params.py)."""
    return {"anyOf": [schema, {"const": ""}]}


def integer_query(name: str, low: int, high: int, description: str) -> dict[str, Any]:
    return query(name, or_empty({"type": "integer", "minimum": low, "maximum": high}), description)


def _unix_seconds(moment: Any) -> int:
    return int((moment - EARLIEST).total_seconds())


# A time: ISO 8601 or Unix seconds, as manager/params.py parse_time reads it.
TIME: Schema = {
    "anyOf": [
        {"type": "string", "format": "date-time"},
        {"type": "integer", "minimum": 0, "maximum": _unix_seconds(LATEST)},
        {"const": ""},
    ],
}
SINCE = query(
    "since",
    TIME,
    f"from this time on: ISO 8601 or Unix seconds, {EARLIEST.date()} to {LATEST.date()}",
)
UNTIL = query("until", TIME, "before this time, later than since; as since")
OWNER = query("owner", {"type": "string", "pattern": IDENTIFIER_PATTERN}, "only this owner's")

# The answers every kind of route shares: the one error shape (SPEC 3).
RESPONSES: dict[str, dict[str, Any]] = {
    "Invalid": json_answer("A parameter or the body breaks a rule; the message names it.", "Error"),
    "Unauthorized": json_answer("No bearer token, or one unknown or revoked.", "Error"),
    "NotFound": json_answer("There is no such thing.", "Error"),
    "Conflict": json_answer("It clashes with the current state.", "Error"),
    "TooLarge": json_answer(
        f"The body is over its cap ({MAX_BODY_BYTES // 1024} KiB; bulk stops more), "
        "declared or chunked.",
        "Error",
    ),
    "Unavailable": json_answer(
        "The database cannot be reached, or the service lacks the settings this needs.",
        "Error",
    ),
}

TAGS = [
    {"name": "api", "description": "Tasks and stops (bearer token)."},
    {"name": "reports", "description": "Reports as JSON or CSV (bearer token)."},
    {
        "name": "subscriptions",
        "description": "Receivers of the tasks' outbound events (bearer token).",
    },
    {"name": "callbacks", "description": "ZEGOCLOUD's signed transcode callbacks."},
    {"name": "ops", "description": "For load balancers, Prometheus and clients; no auth."},
    {"name": "dashboard", "description": "The operators' HTML pages (session cookie)."},
]

DESCRIPTION = (
    "Lifecycle manager for ZEGOCLOUD Single Stream Transcoding tasks: the webhook target "
    "of transcode callbacks, the operator API that stops tasks through "
    "StopCloudTranscode, and the reports. Errors are "
    '`{"error": {"code": "<snake_case>", "message": "..."}}`. Every answer carries '
    "`X-Request-Id`: the request's own when it sent a plausible one, else a new one."
)


# -- the document -------------------------------------------------------------------------


def document(app: Flask) -> dict[str, Any]:
    """The app's document, built on first use (the routes do not change once serving)."""
    built = app.extensions.get(EXTENSION)
    if built is None:
        built = app.extensions[EXTENSION] = build_document(app)
    return built  # type: ignore[no-any-return]


def build_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every documented view of the app."""
    spec = APISpec(
        title="manager",
        version=metadata.version("manager"),
        openapi_version="3.1.0",
        plugins=[FlaskPlugin()],
        info={"description": DESCRIPTION},
        tags=TAGS,
    )
    # apispec resolves references in place: it gets copies, and the views' own stay as
    # they were written.
    for name, schema in COMPONENTS.items():
        spec.components.schema(name, copy.deepcopy(schema))
    spec.components.header(
        "RequestId",
        {
            "description": "The request's X-Request-Id when plausible, else a new id.",
            "required": True,
            "schema": {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"},
        },
    )
    for name, response in RESPONSES.items():
        spec.components.response(name, copy.deepcopy(_with_request_id(response)))
    spec.components.security_scheme(
        BEARER,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "A token from `manager tokens create NAME`.",
        },
    )
    spec.components.security_scheme(
        SESSION,
        {
            "type": "apiKey",
            "in": "cookie",
            "name": app.config.get("SESSION_COOKIE_NAME", "session"),
            "description": "The dashboard's signed session, set by POST /login.",
        },
    )
    for endpoint, view in sorted(app.view_functions.items()):
        documented_as: Operation | None = getattr(view, OPERATION, None)
        if documented_as is None:
            continue  # static files; tests/web/test_openapi.py names any other
        (rule,) = app.url_map.iter_rules(endpoint)  # one rule per view, as FlaskPlugin reads
        methods = sorted((rule.methods or set()) - IGNORED_METHODS)
        operations = {
            method.lower(): _operation(
                documented_as,
                endpoint if len(methods) == 1 else f"{endpoint}.{method.lower()}",
                rule,
                token=getattr(view, GUARD_MARK, False),
            )
            for method in methods
        }
        spec.path(view=view, app=app, operations=copy.deepcopy(operations))
    return spec.to_dict()


def _operation(doc: Operation, name: str, rule: Rule, *, token: bool) -> dict[str, Any]:
    responses: dict[int, Answer] = {
        # A name is one of RESPONSES, which have it already.
        status: answer if isinstance(answer, str) else _with_request_id(answer)
        for status, answer in doc.responses.items()
    }
    responses.setdefault(413, "TooLarge")
    security: list[dict[str, list[str]]]
    if token:
        responses[401] = "Unauthorized"
        security = [{BEARER: []}]
    else:
        security = doc.security or []
    operation: dict[str, Any] = {
        "operationId": name.replace(".", "_"),
        "tags": [name.partition(".")[0]],
        "summary": doc.summary,
        "security": security,
        "responses": dict(sorted(responses.items())),
    }
    if doc.description:
        operation["description"] = doc.description
    parameters = [*_path_parameters(rule, doc.path_parameters), *doc.parameters]
    if parameters:
        operation["parameters"] = parameters
    if doc.body is not None:
        operation["requestBody"] = doc.body
    return operation


def _with_request_id(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer, saying that it carries X-Request-Id, as every answer does."""
    return {**answer, "headers": {"X-Request-Id": "RequestId", **answer.get("headers", {})}}


def _path_parameters(rule: Rule, stated: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The rule's variables, each with the schema its converter matches, unless the view
    states a narrower one."""
    return [
        {
            "in": "path",
            "name": name,
            "required": True,
            "schema": _converter_schema(converter),
            **stated.get(name, {}),
        }
        for name, converter in rule._converters.items()
    ]


def _converter_schema(converter: BaseConverter) -> Schema:
    """What a rule's converter matches, as a JSON Schema."""
    if isinstance(converter, AnyConverter):
        return {"type": "string", "enum": sorted(converter.items)}
    if isinstance(converter, NumberConverter):
        schema: Schema = {
            "type": "integer" if isinstance(converter, IntegerConverter) else "number"
        }
        low = converter.min if converter.min is not None else None if converter.signed else 0
        if low is not None:
            schema["minimum"] = low
        if converter.max is not None:
            schema["maximum"] = converter.max
        return schema
    if isinstance(converter, PathConverter):  # a task id: may hold slashes
        return {"type": "string", "minLength": 1}
    return {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}
