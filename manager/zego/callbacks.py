"""Parse and verify a raw ZEGOCLOUD transcode callback into a typed value.

Nothing here touches the database; see `manager.callbacks.store` for what a verified
callback does to a task.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, unquote_plus

from manager.zego.signing import callback_signature_matches

EVENT_START = "transcode_start"
EVENT_STOP = "transcode_stop"
STATUS_STARTED = "TranscodeStarted"
STATUS_UPDATED = "TranscodeUpdated"
STATUS_STOPPED = "TranscodeStopped"

MAX_ID_LENGTH = 256
MAX_NONCE_LENGTH = 128
INT64_MAX = 2**63 - 1
# Room above every Sequence a callback may carry for the Sequences our own stop
# attempts take (max_seq + 1 each), so that they never overflow a BIGINT.
MAX_CALLBACK_SEQUENCE = INT64_MAX - 2**32
# Far deeper than any real callback, far shallower than Python's recursion limit, which
# json.dumps (the digest, the JSON columns) would otherwise reach when the body is saved.
MAX_JSON_DEPTH = 32
# What a text column cannot hold on every backend (NUL), what cannot be encoded as
# UTF-8 (lone surrogates, from JSON's "\ud800" escapes), and other control characters.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
T = TypeVar("T")


class CallbackError(Exception):
    """A callback that is refused: `code` names why, the kind (subclass) says how; the
    web edge answers each kind with its status (manager/web/callbacks.py)."""

    def __init__(self, code: str, message: str, fields: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        # Whatever could be read before the refusal, so the rejection is auditable.
        self.fields: dict[str, Any] = dict(fields or {})


class MalformedCallback(CallbackError):
    """The body or a field is not what ZEGOCLOUD sends."""


class UnverifiedCallback(CallbackError):
    """The signature does not match, or the Timestamp is outside the freshness window."""


class ForeignCallback(CallbackError):
    """A correctly signed callback for another AppId."""


@dataclass(frozen=True)
class Callback:
    event: str
    app_id: int
    timestamp: int
    timestamp_text: str
    nonce: str
    signature: str = field(repr=False)
    task_id: str
    user_id: str | None
    sequence: int
    sequence_given: bool
    status: str | None
    stop_reason: int | None
    input: dict[str, Any] | None
    outputs: list[Any] | None
    payload: dict[str, Any] = field(repr=False)

    @property
    def is_stop(self) -> bool:
        return self.event == EVENT_STOP

    def event_key(self, *, at_timestamp: bool = False) -> str:
        """Identity of the event for duplicate detection (SPEC 3.2); with `at_timestamp`,
        of this event at its Timestamp, for events that the key alone cannot tell apart."""
        parts: list[Any] = [
            self.app_id,
            self.event,
            self.task_id,
            self.sequence,
            self.status,
            self.stop_reason,
        ]
        if at_timestamp:
            parts.append(self.timestamp)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def body_digest(self) -> str:
        """Digest of the body's content, insensitive to key order and whitespace."""
        canonical = json.dumps(self.payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def audit_fields(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "event": self.event,
            "task_id": self.task_id,
            "user_id": self.user_id,
            "sequence": self.sequence,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "zego_timestamp": self.timestamp,
            "nonce": self.nonce,
        }


def decode_body(raw: bytes, content_type: str | None = None) -> dict[str, Any]:
    """Turn the body into a dict: JSON, percent-encoded JSON, or a form (field holding JSON)."""
    if not raw.strip():
        raise MalformedCallback("empty_body", "the request body is empty")
    try:
        # utf-8-sig: a byte-order mark in front is allowed (RFC 8259 lets parsers ignore it).
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise MalformedCallback("invalid_encoding", "the request body is not UTF-8") from None
    if text.startswith("{"):
        return _json_object(text)
    if text.startswith("%7B") or text.startswith("%7b"):
        return _percent_encoded_json(text)
    if text[:1] in _JSON_VALUE_STARTS:
        try:
            _loads(text)
        except CallbackError:
            pass  # not JSON at all: perhaps a form
        else:
            raise MalformedCallback("invalid_json", "the request body must be a JSON object")
    if "=" in text:
        return _form(text)
    raise MalformedCallback("invalid_body", "the request body is neither JSON nor a form")


# The first character of a JSON text that is not an object.
_JSON_VALUE_STARTS = frozenset('["-0123456789tfn')


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999: JSON columns could not store it
        raise ValueError(f"{text} is out of range")
    return number


def _loads(text: str) -> Any:
    """Strict RFC 8259 JSON (no NaN or Infinity), nested at most MAX_JSON_DEPTH deep."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise MalformedCallback("invalid_json", "the request body is not valid JSON") from None
    # Counting brackets is cheap and, for every real callback, settles it.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth_exceeds(value):
        raise MalformedCallback(
            "invalid_json", f"the request body's JSON is nested over {MAX_JSON_DEPTH} deep"
        )
    return value


def _depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _json_object(text: str) -> dict[str, Any]:
    value = _loads(text)
    if not isinstance(value, dict):
        raise MalformedCallback("invalid_json", "the request body must be a JSON object")
    return value


def _percent_encoded_json(text: str) -> dict[str, Any]:
    # ZEGOCLOUD says "UrlDecode" without saying whether '+' means a space, so try both.
    for decode in (unquote, unquote_plus):
        try:
            return _json_object(decode(text, errors="strict"))
        except (CallbackError, UnicodeDecodeError):
            continue
    raise MalformedCallback("invalid_json", "the percent-encoded body is not a JSON object")


def _form(text: str) -> dict[str, Any]:
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise MalformedCallback("invalid_body", "the form body could not be parsed") from None
    fields = dict(pairs)
    holders = [v for v in fields.values() if v.lstrip().startswith("{")]
    if len(fields) == 1 and holders:
        return _json_object(holders[0].strip())
    return fields


def _get(payload: Mapping[str, Any], name: str) -> Any:
    """ZEGO's capitalised key, falling back to the lowercase spelling of sample code."""
    if name in payload:
        return payload[name]
    return payload.get(name.lower())


def _text(payload: Mapping[str, Any], name: str, *, required: bool, limit: int) -> str | None:
    value = _get(payload, name)
    if value is None or value == "":
        if required:
            raise MalformedCallback("missing_field", f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MalformedCallback("invalid_field", f"{name} must be a string")
    text = str(value)
    if len(text) > limit:
        raise MalformedCallback("invalid_field", f"{name} is longer than {limit} characters")
    problem = identifier_problem(text)
    if problem is not None:
        raise MalformedCallback("invalid_field", f"{name} {problem}")
    return text


def identifier_problem(text: str) -> str | None:
    """Why `text` cannot be a ZEGOCLOUD identifier (TaskId, UserId, StreamId) as we store
    it, as a phrase to follow its name; None when it can."""
    if _UNSTORABLE.search(text):
        return "must be UTF-8 text without control characters"
    return None


def _integer(
    payload: Mapping[str, Any], name: str, *, required: bool, low: int = 0, high: int = INT64_MAX
) -> int | None:
    value = _get(payload, name)
    if value is None or value == "":
        if required:
            raise MalformedCallback("missing_field", f"{name} is required")
        return None
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value.strip())
    if number is None:
        raise MalformedCallback("invalid_field", f"{name} must be an integer")
    if not low <= number <= high:
        raise MalformedCallback("invalid_field", f"{name} must be between {low} and {high}")
    return number


def _required(value: T | None) -> T:
    """Narrow the type of a field read with required=True (which raises when absent)."""
    if value is None:
        raise MalformedCallback("missing_field", "a required field is missing")
    return value


def parse_callback(payload: dict[str, Any], path_event: str | None = None) -> Callback:
    """Validate the fields of a decoded body; every problem is a 400 naming the field."""
    event = _text(payload, "Event", required=path_event is None, limit=32) or path_event
    if event not in (EVENT_START, EVENT_STOP):
        raise MalformedCallback("invalid_field", "Event must be transcode_start or transcode_stop")
    if path_event is not None and event != path_event:
        raise MalformedCallback("invalid_field", f"Event {event} was posted to {path_event}")

    timestamp = _required(_integer(payload, "Timestamp", required=True))
    nonce = _required(_text(payload, "Nonce", required=True, limit=MAX_NONCE_LENGTH))
    signature = _required(_text(payload, "Signature", required=True, limit=128))
    app_id = _required(_integer(payload, "Appid", required=True, high=2**32 - 1))
    task_id = _required(_text(payload, "TaskId", required=True, limit=MAX_ID_LENGTH))
    sequence = _integer(payload, "Sequence", required=False, high=MAX_CALLBACK_SEQUENCE)
    status = _text(payload, "Status", required=event == EVENT_START, limit=32)
    user_id = _text(payload, "UserId", required=event == EVENT_START, limit=MAX_ID_LENGTH)
    stop_reason = None
    if event == EVENT_START:
        if status not in (STATUS_STARTED, STATUS_UPDATED):
            raise MalformedCallback(
                "invalid_field", "Status must be TranscodeStarted or TranscodeUpdated"
            )
    else:
        stop_reason = _integer(payload, "StopReason", required=True, high=1)
    input_, outputs = _details(payload)
    return Callback(
        event=event,
        app_id=app_id,
        timestamp=timestamp,
        timestamp_text=str(_get(payload, "Timestamp")).strip(),
        nonce=nonce,
        signature=signature,
        task_id=task_id,
        user_id=user_id,
        sequence=sequence or 0,
        sequence_given=sequence is not None,
        status=status,
        stop_reason=stop_reason,
        input=input_,
        outputs=outputs,
        payload=payload,
    )


def _details(payload: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[Any] | None]:
    details = _get(payload, "Details")
    if details is None:
        return None, None
    if not isinstance(details, dict):
        raise MalformedCallback("invalid_field", "Details must be an object")
    input_ = details.get("Input")
    outputs = details.get("Outputs")
    if input_ is not None and not isinstance(input_, dict):
        raise MalformedCallback("invalid_field", "Details.Input must be an object")
    if outputs is not None and not (
        isinstance(outputs, list) and all(isinstance(o, dict) for o in outputs)
    ):
        raise MalformedCallback("invalid_field", "Details.Outputs must be a list of objects")
    return input_, outputs


def verify_callback(
    cb: Callback,
    *,
    secrets_: Sequence[str],
    app_id: int,
    now: float,
    max_age: int,
) -> None:
    """Signature (401), then Appid (403), then Timestamp freshness (401), as SPEC 3.1 orders."""
    audit = cb.audit_fields()
    if not callback_signature_matches(secrets_, cb.timestamp_text, cb.nonce, cb.signature):
        raise UnverifiedCallback(
            "invalid_signature", "the callback signature does not match", audit
        )
    if cb.app_id != app_id:
        raise ForeignCallback("wrong_appid", "the callback is for another Appid", audit)
    if abs(now - cb.timestamp) > max_age:
        raise UnverifiedCallback(
            "stale_timestamp", f"Timestamp is more than {max_age}s from now", audit
        )
