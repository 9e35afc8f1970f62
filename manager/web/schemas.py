"""The JSON Schemas of what the HTTP API takes and answers: the components of the
OpenAPI document (manager/web/openapi.py).

Built from the vocabulary and the limits the code enforces, so that a status, a verdict
or a limit is written once; schemathesis holds the running service to them
(tests/web/test_schemathesis.py).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from manager.callbacks.rules import Ending
from manager.events.subscriptions import MAX_OWNER_LENGTH, MAX_SUBSCRIPTIONS, MAX_URL_LENGTH
from manager.params import EARLIEST, LATEST
from manager.reports.daily import DayRow
from manager.reports.owners import OwnerRow
from manager.reports.stuck import NO_DELIVERY, NO_STOP_CALLBACK, StuckTask
from manager.stops.bulk import MAX_BULK_TASKS
from manager.stored_text import MAX_REASON_LENGTH
from manager.vocabulary import (
    EventType,
    SendState,
    StopState,
    TaskStatus,
    Verdict,
    WaitReason,
    values,
)
from manager.zego.callbacks import (
    EVENT_START,
    EVENT_STOP,
    MAX_CALLBACK_SEQUENCE,
    MAX_ID_LENGTH,
    MAX_NONCE_LENGTH,
    STATUS_STARTED,
    STATUS_UPDATED,
)
from manager.zego.client import Outcome

Schema = dict[str, Any]

# Identifiers (task ids, owners) are UTF-8 text without control characters: the rule of
# manager/zego/callbacks.py identifier_problem, which tests/web/test_openapi.py holds
# this pattern to.
IDENTIFIER_PATTERN = "^[^\\u0000-\\u001f\\u007f]*$"
DATE_TIME: Schema = {"type": "string", "format": "date-time"}
COUNT: Schema = {"type": "integer", "minimum": 0}
UINT32_MAX = 2**32 - 1


def ref(name: str) -> Schema:
    """A reference to one of COMPONENTS."""
    return {"$ref": f"#/components/schemas/{name}"}


def enum(kind: type[StrEnum] | Iterable[str]) -> Schema:
    choices = values(kind) if isinstance(kind, type) else tuple(kind)
    return {"type": "string", "enum": list(choices)}


def nullable(schema: Schema) -> Schema:
    """The schema, or null."""
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    nullable_schema = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        nullable_schema["enum"] = [*schema["enum"], None]
    return nullable_schema


def closed(properties: Mapping[str, Schema], description: str | None = None) -> Schema:
    """An object with exactly these properties, every one of them present."""
    schema: Schema = {
        "type": "object",
        "required": list(properties),
        "properties": dict(properties),
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def list_of(schema: Schema) -> Schema:
    return {"type": "array", "items": schema}


def row_schema(row: type[Any], overrides: Mapping[str, Schema] | None = None) -> Schema:
    """A report row (a dataclass) as its JSON: one property per field, from its type."""
    hints = typing.get_type_hints(row)
    properties = {
        field.name: (overrides or {}).get(field.name) or _schema_of_type(hints[field.name])
        for field in dataclasses.fields(row)
    }
    return closed(properties, (row.__doc__ or "").strip() or None)


def _schema_of_type(hint: Any) -> Schema:
    if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint):
        (inner,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return nullable(_schema_of_type(inner))
    if hint is int:
        return dict(COUNT)
    if hint is str:
        return {"type": "string"}
    if hint is datetime:
        return dict(DATE_TIME)
    raise TypeError(f"no JSON Schema for {hint!r}")


# -- errors -------------------------------------------------------------------------------

ERROR_DETAIL: Schema = {
    "code": {"type": "string", "pattern": "^[a-z0-9_]+$", "description": "snake_case"},
    "message": {"type": "string", "description": "what is wrong, for a person"},
}

ERROR = closed(
    {"error": closed(ERROR_DETAIL)},
    "Every error: a snake_case code and a message naming the problem.",
)

# -- tasks --------------------------------------------------------------------------------

TASK = closed(
    {
        "task_id": {"type": "string"},
        "app_id": {"type": "integer", "minimum": 0, "maximum": UINT32_MAX},
        "owner": nullable({"type": "string", "description": "UserId of its start callbacks"}),
        "status": enum(TaskStatus),
        "stop_reason": nullable({"type": "integer", "minimum": 0, "maximum": 1}),
        "sequence": {
            **COUNT,
            "description": "the highest Sequence seen or sent for the task",
        },
        "runs": COUNT,
        "input": nullable({"type": "object", "description": "Details.Input of the latest start"}),
        "outputs": nullable(list_of({"type": "object"})),
        "first_seen_at": DATE_TIME,
        "started_at": nullable(DATE_TIME),
        "ended_at": nullable(DATE_TIME),
        "updated_at": DATE_TIME,
        "last_delivery_at": nullable(DATE_TIME),
        "version": {
            **COUNT,
            "description": "the version of its latest outbound event: grows with each",
        },
    },
    "A task's state. Times are UTC.",
)

RUN = closed(
    {
        "run": {"type": "integer", "minimum": 1},
        "owner": nullable({"type": "string"}),
        "started_at": nullable({**DATE_TIME, "description": "null when its start is unknown"}),
        "ended_at": nullable(DATE_TIME),
        "ended": nullable({**enum(Ending), "description": "how it ended; null while running"}),
        "seconds": nullable(COUNT),
    },
    "One run of a task: from a start to its end.",
)

DELIVERY = closed(
    {
        "id": {"type": "integer", "minimum": 1},
        "received_at": DATE_TIME,
        "event": nullable(enum((EVENT_START, EVENT_STOP))),
        "user_id": nullable({"type": "string"}),
        "sequence": nullable(COUNT),
        "status": nullable({"type": "string"}),
        "stop_reason": nullable({"type": "integer", "minimum": 0, "maximum": 1}),
        "timestamp": nullable({**COUNT, "description": "the callback's Timestamp"}),
        "verdict": enum(Verdict),
        "reason": nullable({"type": "string", "description": "why it was rejected"}),
    },
    "One callback delivery, and what became of it.",
)

STOP_ATTEMPT = closed(
    {
        "attempted_at": DATE_TIME,
        "sequence": COUNT,
        "outcome": enum(Outcome),
        "http_status": nullable({"type": "integer"}),
        "code": nullable({"type": "integer"}),
        "message": nullable({"type": "string"}),
        "request_id": nullable({"type": "string"}),
        "elapsed_ms": COUNT,
        "worker": nullable({"type": "string"}),
    },
    "One call of StopCloudTranscode for a stop request.",
)

_STOP_REQUEST: dict[str, Schema] = {
    "id": {"type": "integer", "minimum": 1},
    "task_id": {"type": "string"},
    "state": enum(StopState),
    "sequence": nullable({**COUNT, "description": "the Sequence sent"}),
    "user_id": {"type": "string", "description": "the owner the stop is sent as"},
    "requested_by": {"type": "string", "description": "the token's name"},
    "reason": nullable({"type": "string"}),
    "force": {"type": "boolean"},
    "batch_id": nullable({"type": "integer", "minimum": 1}),
    "created_at": DATE_TIME,
    "attempts": COUNT,
    "next_attempt_at": nullable({**DATE_TIME, "description": "while queued"}),
    "wait_reason": nullable({**enum(WaitReason), "description": "why a queued stop waits"}),
    "completed_at": nullable(DATE_TIME),
    "zego": closed(
        {
            "code": nullable({"type": "integer"}),
            "message": nullable({"type": "string"}),
            "request_id": nullable({"type": "string"}),
        },
        "ZEGOCLOUD's latest answer.",
    ),
}
STOP_REQUEST = closed(_STOP_REQUEST, "A stop request: who asked, why, and how it went.")
STOP_REQUEST_WITH_ATTEMPTS = closed(
    {**_STOP_REQUEST, "attempt_log": list_of(ref("StopAttempt"))},
    "A stop request with every attempt at it.",
)

TASK_PAGE = closed(
    {
        "tasks": list_of(ref("Task")),
        "next_cursor": nullable({"type": "string", "description": "null on the last page"}),
    },
    "A page of tasks, newest first.",
)

TASK_DETAIL = closed(
    {
        "task": ref("Task"),
        "runs": list_of(ref("Run")),
        "deliveries": list_of(ref("Delivery")),
        "stop_requests": list_of(ref("StopRequestWithAttempts")),
    },
    "A task, its runs (in order), deliveries and stop requests (newest first).",
)

STOP_ANSWER = closed(
    {
        "stop_request": ref("StopRequest"),
        "created": {
            "type": "boolean",
            "description": "false: a stop already in flight for the task is returned",
        },
    },
)

ZEGO_REFUSAL = closed(
    {
        "error": closed(
            {
                "code": {"const": "zego_refused"},
                "message": {"type": "string"},
                "zego_code": nullable({"type": "integer"}),
                "zego_message": nullable({"type": "string"}),
                "request_id": nullable({"type": "string"}),
            }
        ),
        "stop_request": ref("StopRequest"),
        "created": {"type": "boolean"},
    },
    "ZEGOCLOUD refused the stop for good: its Code and Message, and the stop request.",
)

# -- stops --------------------------------------------------------------------------------

TASK_IDS: Schema = {
    "type": "array",
    "items": {"type": "string", "pattern": IDENTIFIER_PATTERN},
    "minItems": 1,
    "maxItems": MAX_BULK_TASKS,
}
OWNER: Schema = {"type": "string", "pattern": IDENTIFIER_PATTERN}
REASON: Schema = nullable(
    {
        "type": "string",
        "maxLength": MAX_REASON_LENGTH,
        "pattern": "^[^\\u0000]*$",
        "description": "why, in the operator's words; kept with the stop request",
    }
)

STOP_BODY: Schema = {
    "type": "object",
    "properties": {"reason": REASON},
    "description": "Optional; other properties are ignored.",
}

SELECTOR: Schema = {
    "oneOf": [
        closed({"task_ids": TASK_IDS}),
        closed({"owner": OWNER}),
        closed({"all_running": {"const": True}}),
    ],
    "description": "Which tasks: these, an owner's running ones, or every running one.",
}

# A selector given as null or false counts as left out (BulkSelection.from_json).
_LEFT_OUT: Schema = {"enum": [None, False], "description": "the same as left out"}
BULK_STOP_BODY: Schema = {
    "type": "object",
    "properties": {
        "task_ids": {"anyOf": [TASK_IDS, _LEFT_OUT]},
        "owner": {
            "anyOf": [OWNER, _LEFT_OUT],
            "description": "every running task of this owner",
        },
        "all_running": {"enum": [True, False, None], "description": "true: every running task"},
        "reason": REASON,
    },
    "oneOf": [
        {"required": ["task_ids"], "properties": {"task_ids": TASK_IDS}},
        {"required": ["owner"], "properties": {"owner": OWNER}},
        {"required": ["all_running"], "properties": {"all_running": {"const": True}}},
    ],
    "description": "Exactly one of task_ids, owner, all_running; other properties are ignored.",
}

BATCH = closed(
    {
        "id": {"type": "integer", "minimum": 1},
        "created_at": DATE_TIME,
        "requested_by": {"type": "string"},
        "reason": nullable({"type": "string"}),
        "selector": SELECTOR,
        "total": {**COUNT, "description": "stop requests queued"},
        "progress": closed({state: COUNT for state in values(StopState)}),
        "done": {"type": "boolean", "description": "none is queued any more"},
        "items": list_of(ref("StopRequest")),
    },
    "A bulk stop: one stop request per task, worked off by the worker.",
)

BULK_STOP_ANSWER = closed(
    {
        "batch": ref("Batch"),
        "skipped": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "task id -> why no stop was queued for it",
        },
    },
)

BATCH_ANSWER = closed({"batch": ref("Batch")})

# -- reports ------------------------------------------------------------------------------

OWNER_ROW = row_schema(OwnerRow)
DAY_ROW = row_schema(DayRow, {"day": {"type": "string", "format": "date"}})
STUCK_ROW = row_schema(
    StuckTask,
    {
        "status": enum((TaskStatus.RUNNING, TaskStatus.STOPPING)),
        "reason": enum((NO_STOP_CALLBACK, NO_DELIVERY)),
    },
)

SUMMARY = closed(
    {
        "tasks": closed(
            {**{status: COUNT for status in values(TaskStatus)}, "total": COUNT},
            "Tasks with a run overlapping the window, by their status now.",
        ),
        "started": COUNT,
        "ended": {**COUNT, "description": "stopped + failed + ended_unseen"},
        "ended_unseen": COUNT,
        "failure_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "duration_seconds": closed(
            {key: nullable({"type": "number", "minimum": 0}) for key in ("mean", "p50", "p95")},
            "Of the runs ended in the window; null without one.",
        ),
        "stop_requests": closed({state: COUNT for state in values(StopState)}),
        "deliveries": closed({verdict: COUNT for verdict in values(Verdict)}),
    },
    "The summary report.",
)

OWNERS = closed(
    {
        "owners": list_of(ref("OwnerRow")),
        "more": {"type": "boolean"},
        "next_cursor": nullable({"type": "string"}),
    },
    "The owners report, a page at a time, most transcoding first.",
)
DAILY = closed({"days": list_of(ref("DayRow"))}, "The daily report: one row per UTC day.")
STUCK = closed({"tasks": list_of(ref("StuckTask"))}, "The stuck report, longest stuck first.")

REPORT: Schema = {
    "oneOf": [ref("Summary"), ref("Owners"), ref("Daily"), ref("Stuck")],
    "description": "The report `name` asks for.",
}

# -- subscriptions (outbound events) ------------------------------------------------------

EVENT_TYPES: Schema = {
    **list_of(enum(EventType)),
    "minItems": 1,
    "description": "the types it takes; null or left out: every type",
}
_SUBSCRIPTION: dict[str, Schema] = {
    "id": {"type": "integer", "minimum": 1},
    "url": {"type": "string"},
    "event_types": nullable(list_of(enum(EventType))),
    "owner": nullable({"type": "string", "description": "only this owner's tasks"}),
    "description": nullable({"type": "string"}),
    "created_at": DATE_TIME,
    "enabled": {"type": "boolean"},
    "disabled_at": nullable(DATE_TIME),
    "disabled_reason": nullable({"type": "string"}),
    "failing_since": nullable({**DATE_TIME, "description": "since when every attempt failed"}),
    "last_success_at": nullable(DATE_TIME),
    "previous_secret_until": nullable(
        {**DATE_TIME, "description": "after a rotation, the old secret signs too until then"}
    ),
}
SUBSCRIPTION = closed(_SUBSCRIPTION, "A receiver of the tasks' outbound events; never its secret.")

SECRET: Schema = {
    "type": "string",
    "pattern": "^whsec_",
    "description": "the signing secret (Standard Webhooks); shown in this answer only",
}
SUBSCRIPTION_WITH_SECRET = closed(
    {**_SUBSCRIPTION, "secret": SECRET},
    "A subscription and its new signing secret, which is not shown again.",
)

SUBSCRIPTION_HEALTH = closed(
    {
        "pending": COUNT,
        "delivered": COUNT,
        "failed": COUNT,
        "oldest_pending_at": nullable(DATE_TIME),
        "oldest_pending_seconds": nullable(COUNT),
    },
    "Its sends by state, and how long the oldest pending one has waited.",
)
SUBSCRIPTION_WITH_HEALTH = closed(
    {**_SUBSCRIPTION, "health": ref("SubscriptionHealth")},
    "A subscription and how its sends fare.",
)
SUBSCRIPTION_LIST = closed(
    {"subscriptions": list_of(ref("SubscriptionWithHealth"))},
    f"Every subscription (at most {MAX_SUBSCRIPTIONS}), oldest first.",
)

SUBSCRIPTION_BODY: Schema = {
    "type": "object",
    "required": ["url"],
    "properties": {
        "url": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_URL_LENGTH,
            "description": "http:// or https://, ASCII, no credentials or fragment",
        },
        "event_types": nullable(EVENT_TYPES),
        "owner": nullable(
            {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_OWNER_LENGTH,
                "pattern": IDENTIFIER_PATTERN,
                "description": "only this owner's (UserId) tasks; null: every owner's",
            }
        ),
        "description": nullable(
            {"type": "string", "maxLength": MAX_REASON_LENGTH, "pattern": "^[^\\u0000]*$"}
        ),
    },
    "description": "Other properties are ignored.",
}

DISABLE_BODY: Schema = {
    "type": "object",
    "properties": {"reason": REASON},
    "description": "Optional; other properties are ignored.",
}

_UNIX_LATEST = int((LATEST - EARLIEST).total_seconds())
REPLAY_BODY: Schema = {
    "type": "object",
    "required": ["since"],
    "properties": {
        "since": {
            "anyOf": [
                DATE_TIME,
                {"type": "integer", "minimum": 0, "maximum": _UNIX_LATEST},
                {"type": "string", "pattern": "^[0-9]+$"},
            ],
            "description": (
                f"events written at or after this time: ISO 8601 or Unix seconds, "
                f"{EARLIEST.date()} to {LATEST.date()}"
            ),
        },
    },
    "description": "Other properties are ignored.",
}
REPLAY_ANSWER = closed(
    {"replayed": {**COUNT, "description": "how many sends are pending again"}},
)

SEND_ATTEMPT = closed(
    {
        "attempted_at": DATE_TIME,
        "status": nullable({"type": "integer", "description": "null: no answer came"}),
        "error": nullable({"type": "string", "description": "why no answer came"}),
        "answer": nullable({"type": "string", "description": "the answer's first bytes"}),
        "elapsed_ms": COUNT,
    },
    "One POST of an event to the subscription, and what came back.",
)
EVENT_SEND = closed(
    {
        "id": {"type": "integer", "minimum": 1},
        "webhook_id": {"type": "string", "description": "the webhook-id header it is sent with"},
        "type": enum(EventType),
        "task_id": {"type": "string"},
        "version": COUNT,
        "state": enum(SendState),
        "attempts": COUNT,
        "next_attempt_at": nullable({**DATE_TIME, "description": "while pending"}),
        "created_at": DATE_TIME,
        "completed_at": nullable(DATE_TIME),
        "replayed_at": nullable(DATE_TIME),
        "log": list_of(ref("SendAttempt")),
    },
    "One event for the subscription, with every attempt at sending it.",
)
EVENT_SEND_PAGE = closed(
    {
        "deliveries": list_of(ref("EventSend")),
        "next_cursor": nullable({"type": "string", "description": "null on the last page"}),
    },
    "A page of the subscription's delivery log, newest first.",
)

# -- callbacks ----------------------------------------------------------------------------

_DIGITS = "^[0-9]+$"


def _number(maximum: int, description: str) -> Schema:
    """An integer field of a callback, which ZEGOCLOUD may send as a string."""
    return {
        "oneOf": [
            {"type": "integer", "minimum": 0, "maximum": maximum},
            {"type": "string", "pattern": _DIGITS},
        ],
        "description": description,
    }


def _text(max_length: int, description: str) -> Schema:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": max_length,
        "pattern": IDENTIFIER_PATTERN,
        "description": description,
    }


_CALLBACK_FIELDS: dict[str, Schema] = {
    "Event": enum((EVENT_START, EVENT_STOP)),
    "Appid": _number(UINT32_MAX, "must equal ZEGO_APP_ID (else 403)"),
    "Timestamp": _number(2**63 - 1, "Unix seconds; signed; within CALLBACK_MAX_AGE of now"),
    "Nonce": _text(MAX_NONCE_LENGTH, "signed"),
    "Signature": _text(128, "sha1(sorted [secret, Timestamp, Nonce]) in hex"),
    "TaskId": _text(MAX_ID_LENGTH, "the task"),
    "UserId": _text(MAX_ID_LENGTH, "the task's owner; required for transcode_start"),
    "Sequence": _number(MAX_CALLBACK_SEQUENCE, "orders a task's events; missing counts as 0"),
    "Status": {
        "type": "string",
        "description": f"{STATUS_STARTED} or {STATUS_UPDATED} (required) for transcode_start",
    },
    "StopReason": {
        "oneOf": [{"enum": [0, 1]}, {"enum": ["0", "1"]}],
        "description": "0 stopped, 1 failed; required for transcode_stop",
    },
    "Details": {
        "type": "object",
        "properties": {
            "Input": {"type": "object"},
            "Outputs": list_of({"type": "object"}),
        },
    },
}
_SIGNED = ["Appid", "Timestamp", "Nonce", "Signature", "TaskId"]

CALLBACK = {
    "type": "object",
    "properties": _CALLBACK_FIELDS,
    "required": ["Event", *_SIGNED],
    "description": "A ZEGOCLOUD transcode callback, keys as ZEGOCLOUD sends them.",
}
EVENT_CALLBACK = {
    "type": "object",
    "properties": _CALLBACK_FIELDS,
    "required": _SIGNED,
    "description": "As Callback; Event may be left out, the path names it.",
}
CALLBACK_FORM: Schema = {
    "anyOf": [
        {
            "type": "object",
            "properties": {name: {"type": "string"} for name in _CALLBACK_FIELDS},
            "required": _SIGNED,
            "description": "The fields as form fields.",
        },
        {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "additionalProperties": {"type": "string", "contentMediaType": "application/json"},
            "description": "One form field holding the callback as JSON.",
        },
    ],
}

CALLBACK_ANSWER = closed(
    {
        "code": {"const": 0},
        "verdict": enum((Verdict.APPLIED, Verdict.DUPLICATE, Verdict.STALE)),
    },
    "The callback is stored: ZEGOCLOUD is to stop retrying it.",
)

# -- service ------------------------------------------------------------------------------

HEALTH = closed({"status": {"const": "ok"}})
READY = closed({"status": {"const": "ready"}})
OPENAPI = {
    "type": "object",
    "required": ["openapi", "info", "paths"],
    "properties": {"openapi": {"type": "string", "pattern": "^3\\.1\\.[0-9]+$"}},
    "description": "This document.",
}

COMPONENTS: dict[str, Schema] = {
    "Error": ERROR,
    "Task": TASK,
    "Run": RUN,
    "Delivery": DELIVERY,
    "StopAttempt": STOP_ATTEMPT,
    "StopRequest": STOP_REQUEST,
    "StopRequestWithAttempts": STOP_REQUEST_WITH_ATTEMPTS,
    "TaskPage": TASK_PAGE,
    "TaskDetail": TASK_DETAIL,
    "StopBody": STOP_BODY,
    "StopAnswer": STOP_ANSWER,
    "ZegoRefusal": ZEGO_REFUSAL,
    "BulkStopBody": BULK_STOP_BODY,
    "Batch": BATCH,
    "BulkStopAnswer": BULK_STOP_ANSWER,
    "BatchAnswer": BATCH_ANSWER,
    "Summary": SUMMARY,
    "OwnerRow": OWNER_ROW,
    "Owners": OWNERS,
    "DayRow": DAY_ROW,
    "Daily": DAILY,
    "StuckTask": STUCK_ROW,
    "Stuck": STUCK,
    "Report": REPORT,
    "Callback": CALLBACK,
    "EventCallback": EVENT_CALLBACK,
    "CallbackForm": CALLBACK_FORM,
    "CallbackAnswer": CALLBACK_ANSWER,
    "Health": HEALTH,
    "Ready": READY,
    "OpenApi": OPENAPI,
    "Subscription": SUBSCRIPTION,
    "SubscriptionWithSecret": SUBSCRIPTION_WITH_SECRET,
    "SubscriptionHealth": SUBSCRIPTION_HEALTH,
    "SubscriptionWithHealth": SUBSCRIPTION_WITH_HEALTH,
    "SubscriptionList": SUBSCRIPTION_LIST,
    "SubscriptionBody": SUBSCRIPTION_BODY,
    "DisableBody": DISABLE_BODY,
    "ReplayBody": REPLAY_BODY,
    "ReplayAnswer": REPLAY_ANSWER,
    "SendAttempt": SEND_ATTEMPT,
    "EventSend": EVENT_SEND,
    "EventSendPage": EVENT_SEND_PAGE,
}
