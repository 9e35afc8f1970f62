"""Bad input of every kind is a 4xx JSON error naming the problem, changes no task,
is recorded as a rejected delivery, and never produces a 5xx."""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import JSON, Text, cast, func, select
from sqlalchemy.orm import Session
from werkzeug.test import EnvironBuilder, TestResponse
from werkzeug.wrappers import Request

from manager.config import MAX_BODY_BYTES
from manager.models import Delivery, Task
from manager.web.callbacks import STORED_BODY_BYTES
from manager.zego.callbacks import MAX_CALLBACK_SEQUENCE
from manager.zego.signing import callback_signature

from ..conftest import CALLBACK_SECRET, callback

START = "transcode_start"
STOP = "transcode_stop"
ROOT = "/callbacks/zego"
PATHS = (ROOT, f"{ROOT}/{START}", f"{ROOT}/{STOP}")
CONTENT_TYPES = (
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zzz",
    "text/plain; charset=latin-1",
    "application/octet-stream",
    "nonsense",
)
SIGNED_FIELDS = ("Timestamp", "Nonce", "Signature")  # all the signature covers, with the secret
FIELDS = {
    START: ("Event", "Appid", "TaskId", "UserId", "Sequence", "Status", "Details", *SIGNED_FIELDS),
    STOP: (
        "Event",
        "Appid",
        "TaskId",
        "UserId",
        "Sequence",
        "Status",
        "StopReason",
        *SIGNED_FIELDS,
    ),
}
SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


class _Delete:
    """As a field's new value: remove the field."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- sending and observing ------------------------------------------------------------


@dataclass
class Exchange:
    body: bytes
    status: int
    json: Any
    tasks_before: list[tuple[Any, ...]]
    tasks_after: list[tuple[Any, ...]]
    deliveries: list[Any]  # rows of `deliveries` written while the request ran
    chunked: bool = False

    def describe(self) -> str:
        return f"{self.status} {self.json!r} for {self.body[:300]!r}"


def task_rows(db: Session) -> list[tuple[Any, ...]]:
    """Every task, whole; JSON columns as their stored text (cheap to compare)."""
    columns = [cast(c, Text) if isinstance(c.type, JSON) else c for c in Task.__table__.columns]
    try:
        return [tuple(row) for row in db.execute(select(*columns).order_by(Task.id))]
    finally:
        db.rollback()  # never keep a transaction (on SQLite: the write lock) open


def last_delivery_id(db: Session) -> int:
    try:
        return int(db.execute(select(func.coalesce(func.max(Delivery.id), 0))).scalar_one())
    finally:
        db.rollback()


def deliveries_after(db: Session, last_id: int) -> list[Any]:
    try:
        table = Delivery.__table__
        query = select(table).where(table.c.id > last_id).order_by(table.c.id)
        return list(db.execute(query).all())
    finally:
        db.rollback()


def observe(
    db: Session, body: bytes, do: Callable[[], TestResponse], chunked: bool = False
) -> Exchange:
    before, last = task_rows(db), last_delivery_id(db)
    response = do()
    return Exchange(
        body=body,
        status=response.status_code,
        json=response.get_json(silent=True),
        tasks_before=before,
        tasks_after=task_rows(db),
        deliveries=deliveries_after(db, last),
        chunked=chunked,
    )


def send(
    client: FlaskClient,
    db: Session,
    body: bytes | str | dict[str, Any],
    path: str = ROOT,
    content_type: str | None = "application/json",
    **kwargs: Any,
) -> Exchange:
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    data = body

    def post() -> TestResponse:
        # The bytes as they are: `data=` would build a multipart body for a multipart type.
        stream = BytesIO(data)
        return client.post(path, input_stream=stream, content_type=content_type, **kwargs)

    return observe(db, body, post)


def send_chunked(
    client: FlaskClient, db: Session, body: bytes, path: str = ROOT, terminated: bool = True
) -> Exchange:
    """A Transfer-Encoding: chunked request, as a WSGI server hands it over: no CONTENT_LENGTH."""
    environ = EnvironBuilder(
        path=path, method="POST", input_stream=BytesIO(body), content_type="application/json"
    ).get_environ()
    del environ["CONTENT_LENGTH"]
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    if terminated:  # gunicorn promises that the stream ends where the chunks end
        environ["wsgi.input_terminated"] = True
    return observe(db, body, lambda: client.open(Request(environ)), chunked=True)


def error_of(ex: Exchange) -> tuple[str, str]:
    """The {"error": {"code", "message"}} of a response, checked for shape."""
    assert isinstance(ex.json, dict), ex.describe()
    assert set(ex.json) == {"error"}, ex.describe()
    error = ex.json["error"]
    assert isinstance(error, dict), ex.describe()
    assert set(error) == {"code", "message"}, ex.describe()
    code, message = error["code"], error["message"]
    assert isinstance(code, str), ex.describe()
    assert SNAKE_CASE.fullmatch(code), ex.describe()
    assert isinstance(message, str), ex.describe()
    assert message.strip(), ex.describe()
    return code, message


def assert_refused(
    ex: Exchange,
    *,
    status: int | None = None,
    code: str | None = None,
    mentions: tuple[str, ...] = (),
) -> tuple[str, str]:
    """A 4xx JSON error, no task touched, and exactly one 'rejected' delivery recorded."""
    assert ex.status < 500, ex.describe()
    assert 400 <= ex.status < 500, ex.describe()
    got_code, message = error_of(ex)
    if status is not None:
        assert ex.status == status, ex.describe()
    if code is not None:
        assert got_code == code, ex.describe()
    for word in mentions:
        assert word in message, f"{word!r} not named: {ex.describe()}"
    assert ex.tasks_after == ex.tasks_before, ex.describe()
    assert len(ex.deliveries) == 1, ex.describe()
    [delivery] = ex.deliveries
    assert (delivery.verdict, delivery.reason) == ("rejected", got_code), ex.describe()
    assert delivery.task_pk is None
    assert delivery.event_key is None
    assert isinstance(delivery.raw_body, bytes)
    if ex.chunked:
        too_big = len(ex.body) > MAX_BODY_BYTES
        assert delivery.body_size == (MAX_BODY_BYTES + 1 if too_big else len(ex.body))
        assert delivery.raw_body == (b"" if too_big else ex.body[:STORED_BODY_BYTES])
    else:
        assert delivery.body_size == len(ex.body)
        expected = b"" if len(ex.body) > MAX_BODY_BYTES else ex.body[:STORED_BODY_BYTES]
        assert delivery.raw_body == expected
    return got_code, message


def assert_no_server_error(ex: Exchange) -> None:
    """Whatever the verdict: not a 5xx, and an error is well-formed, recorded and harmless."""
    assert ex.status < 500, ex.describe()
    if ex.status >= 400:
        assert_refused(ex)
    else:
        assert ex.status == 200, ex.describe()
        assert ex.json["code"] == 0, ex.describe()


def assert_applied(ex: Exchange) -> None:
    assert ex.status == 200, ex.describe()
    assert ex.json == {"code": 0, "verdict": "applied"}, ex.describe()
    assert len(ex.tasks_after) == len(ex.tasks_before) + 1


def signed(event: str = START, **changes: Any) -> dict[str, Any]:
    """A valid callback for a task of its own, with fields replaced (or DELETEd)."""
    body: dict[str, Any] = callback(event, task_id=f"bad-{uuid.uuid4().hex[:12]}")
    for name, value in changes.items():
        if value is DELETE:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def path_accepts(path: str, event: str) -> bool:
    return path in (ROOT, f"{ROOT}/{event}")


# --- strategies -----------------------------------------------------------------------

# Characters JSON can carry but a database may not: NUL, other controls, lone surrogates.
AWKWARD_CHARS = st.sampled_from(["\x00", "\x01", "\x7f", "\ud800", "\udfff", "\ufeff", "\u2028"])
JSON_TEXT = st.lists(st.characters() | AWKWARD_CHARS, max_size=12).map("".join)
JSON_NUMBERS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1])
    | st.floats(allow_nan=False, allow_infinity=False)
)
JSON_SCALARS = st.none() | st.booleans() | JSON_NUMBERS | JSON_TEXT
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(JSON_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)
KNOWN_KEYS = st.sampled_from(sorted({*FIELDS[START], *FIELDS[STOP]}))
CALLBACK_SHAPED = st.dictionaries(KNOWN_KEYS | JSON_TEXT, JSON_VALUES, max_size=12)

PATH = st.sampled_from(PATHS)
CONTENT_TYPE = st.sampled_from(CONTENT_TYPES)
TEXT_PREFIXES = st.sampled_from(
    ["", "{", '{"', "%7B", "%7b%22", "data=", "Event=transcode_start&", "["]
)


ENCODINGS: dict[str, Callable[[str], str]] = {
    "json": lambda text: text,
    "quote": quote,
    "quote_plus": quote_plus,
    "form field": lambda text: urlencode({"data": text}),
}


# --- 1. properties --------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=1024), path=PATH, content_type=CONTENT_TYPE)
def test_random_bytes_are_refused(
    client: FlaskClient, db: Session, body: bytes, path: str, content_type: str | None
) -> None:
    assert_refused(send(client, db, body, path, content_type))


@FUZZ
@given(prefix=TEXT_PREFIXES, text=st.text(max_size=300), path=PATH, content_type=CONTENT_TYPE)
def test_random_text_is_refused(
    client: FlaskClient, db: Session, prefix: str, text: str, path: str, content_type: str | None
) -> None:
    assert_refused(send(client, db, (prefix + text).encode(), path, content_type))


@FUZZ
@given(value=JSON_VALUES | CALLBACK_SHAPED, path=PATH, content_type=CONTENT_TYPE)
def test_random_json_is_refused(
    client: FlaskClient, db: Session, value: Any, path: str, content_type: str | None
) -> None:
    assert_refused(send(client, db, json.dumps(value).encode(), path, content_type))


@st.composite
def one_field_changed(draw: st.DrawFn) -> tuple[str, str, Any]:
    event = draw(st.sampled_from([START, STOP]))
    name = draw(st.sampled_from(FIELDS[event]))
    value = draw(st.just(DELETE) | JSON_VALUES)
    return event, name, value


@FUZZ
@given(change=one_field_changed(), path=PATH, content_type=CONTENT_TYPE)
def test_valid_callback_with_one_field_changed(
    client: FlaskClient,
    db: Session,
    change: tuple[str, str, Any],
    path: str,
    content_type: str | None,
) -> None:
    event, name, value = change
    original = signed(event)
    body = dict(original)
    if value is DELETE:
        del body[name]
    else:
        body[name] = value
    ex = send(client, db, body, path, content_type)
    if ex.status == 200:
        # Still a validly signed callback: only possible if the change left the signed text alone.
        assert name not in SIGNED_FIELDS or str(value).strip() == str(original[name]), ex.describe()
        assert_no_server_error(ex)
    else:
        assert_refused(ex)


@FUZZ
@given(
    event=st.sampled_from([START, STOP]),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    path=PATH,
    content_type=CONTENT_TYPE,
    data=st.data(),
)
def test_valid_callback_encoded_and_truncated(
    client: FlaskClient,
    db: Session,
    event: str,
    encoding: str,
    path: str,
    content_type: str | None,
    data: st.DataObject,
) -> None:
    encoded = ENCODINGS[encoding](json.dumps(signed(event))).encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded)), label="cut")
    ex = send(client, db, encoded[:cut], path, content_type)
    if cut == len(encoded) and path_accepts(path, event):
        assert_applied(ex)
    elif cut == len(encoded):
        assert_refused(ex, status=400, code="invalid_field", mentions=("Event",))
    else:
        assert_refused(ex)


# --- 2. explicit cases: the body as a whole -------------------------------------------

VALID = json.dumps(callback(task_id="body-level"))
BODY_CASES: list[tuple[str, bytes, int, str, tuple[str, ...]]] = [
    # (id, body, status, code, words the message must contain)
    ("empty", b"", 400, "empty_body", ("empty",)),
    ("whitespace", b" \r\n\t ", 400, "empty_body", ("empty",)),
    ("open brace", b"{", 400, "invalid_json", ("JSON",)),
    ("unterminated", b'{"Event": "transcode_start", ', 400, "invalid_json", ("JSON",)),
    ("trailing comma", b'{"Event": "transcode_start",}', 400, "invalid_json", ("JSON",)),
    ("single quotes", b"{'Event': 'transcode_start'}", 400, "invalid_json", ("JSON",)),
    ("bad literal", b'{"Sequence": tru}', 400, "invalid_json", ("JSON",)),
    ("trailing garbage", VALID.encode() + b" x", 400, "invalid_json", ("JSON",)),
    ("truncated valid body", VALID.encode()[:-1], 400, "invalid_json", ("JSON",)),
    ("raw NUL in a JSON string", b'{"TaskId": "a\x00b"}', 400, "invalid_json", ("JSON",)),
    ("NUL after a valid body", VALID.encode() + b"\x00", 400, "invalid_json", ("JSON",)),
    ("NUL bytes", b"\x00" * 64, 400, "invalid_body", ()),
    ("NUL then JSON", b"\x00" + VALID.encode(), 400, "invalid_body", ()),
    ("only a control character", b"\x1f", 400, "invalid_body", ()),
    ("invalid UTF-8", b"\xff\xfe\xfd", 400, "invalid_encoding", ("UTF-8",)),
    ("latin-1 in JSON", b'{"TaskId": "caf\xe9"}', 400, "invalid_encoding", ("UTF-8",)),
    ("broken UTF-8 pair", b'{"TaskId": "\xc3\x28"}', 400, "invalid_encoding", ("UTF-8",)),
    ("UTF-8 surrogate", b'{"TaskId": "\xed\xa0\x80"}', 400, "invalid_encoding", ("UTF-8",)),
    ("overlong UTF-8", b'{"TaskId": "\xc0\xaf"}', 400, "invalid_encoding", ("UTF-8",)),
    ("nested 60000 deep", b'{"a": ' + b"[" * 60_000, 400, "invalid_json", ("JSON",)),
    ("nested objects", b'{"a":' * 12_000, 400, "invalid_json", ("JSON",)),
    ("100000 brackets", b"[" * 100_000, 413, "body_too_large", (str(MAX_BODY_BYTES),)),
    ("percent junk", b"%7B%22Event%22%3A%ZZ", 400, "invalid_json", ("JSON",)),
    ("percent non-UTF-8", b"%7B%FF%FE%7D", 400, "invalid_json", ("JSON",)),
    ("percent truncated", quote(VALID)[:-3].encode(), 400, "invalid_json", ("JSON",)),
    ("form field broken JSON", b"data=%7B%22Event", 400, "invalid_json", ("JSON",)),
    ("form not strict", b"a=b&&&c", 400, "invalid_body", ("form",)),
    ("form without Event", b"TaskId=t&Appid=1", 400, "missing_field", ("Event",)),
    ("plain words", b"hello world", 400, "invalid_body", ()),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "mentions"),
    [pytest.param(*case[1:], id=case[0]) for case in BODY_CASES],
)
def test_bad_body_is_refused(
    client: FlaskClient, db: Session, body: bytes, status: int, code: str, mentions: tuple[str, ...]
) -> None:
    for path in PATHS:
        if code == "missing_field" and path != ROOT:
            continue  # the path names the event
        ex = send(client, db, body, path)
        assert_refused(ex, status=status, code=code, mentions=mentions)


@pytest.mark.parametrize(
    "body",
    [b"[1, 2]", b"[]", b'"transcode_start"', b"42", b"null", b"true", b"[" + VALID.encode() + b"]"],
    ids=["array", "empty array", "string", "number", "null", "true", "callback in an array"],
)
def test_json_that_is_not_an_object_is_refused_as_such(
    client: FlaskClient, db: Session, body: bytes
) -> None:
    """The message must say what is wrong: a JSON object is needed (not 'neither JSON …')."""
    code, message = assert_refused(send(client, db, body), status=400)
    assert code in ("invalid_json", "invalid_body")
    assert "object" in message, message


@pytest.mark.parametrize(
    "token", ["NaN", "Infinity", "-Infinity"], ids=["nan", "infinity", "minus-infinity"]
)
@pytest.mark.parametrize("where", ["Details.Input", "Sequence", "unknown key"])
def test_non_standard_json_numbers_are_refused(
    client: FlaskClient, db: Session, token: str, where: str
) -> None:
    """NaN and Infinity are not JSON (RFC 8259); Python's json module accepts them."""
    body = signed()
    if where == "Details.Input":
        body["Details"] = {"Input": {"Width": "__NUMBER__"}}
    elif where == "Sequence":
        body["Sequence"] = "__NUMBER__"
    else:
        body["Extra"] = "__NUMBER__"
    raw = json.dumps(body).replace('"__NUMBER__"', token)
    code, _ = assert_refused(send(client, db, raw), status=400)
    assert code in ("invalid_json", "invalid_field")


# --- 2. explicit cases: sizes and framing ---------------------------------------------


def padded(body: dict[str, Any], size: int) -> bytes:
    """The body as JSON, padded with insignificant whitespace to exactly `size` bytes."""
    raw = json.dumps(body).encode()
    assert len(raw) < size
    return raw[:-1] + b" " * (size - len(raw)) + raw[-1:]


def test_body_of_exactly_64_kib_is_accepted(client: FlaskClient, db: Session) -> None:
    assert_applied(send(client, db, padded(signed(), MAX_BODY_BYTES)))


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 70_000, 1_000_000])
def test_body_over_64_kib_is_413(client: FlaskClient, db: Session, size: int) -> None:
    ex = send(client, db, padded(signed(), size))
    assert_refused(ex, status=413, code="body_too_large", mentions=(str(MAX_BODY_BYTES),))


@pytest.mark.parametrize(
    "declared",
    [MAX_BODY_BYTES + 1, 10**9, 3_000_000_000, 2**63 - 1, 10**30],
    ids=["cap+1", "1e9", "3e9 (over int32)", "int64 max", "1e30 (over int64)"],
)
def test_declared_length_over_the_cap_is_413_unread(
    client: FlaskClient, db: Session, declared: int
) -> None:
    """Content-Length is the client's claim: refuse it without reading, and record it."""
    ex = send(client, db, b"{}", environ_overrides={"CONTENT_LENGTH": str(declared)})
    assert ex.status < 500, ex.describe()
    assert ex.status == 413, ex.describe()
    assert error_of(ex)[0] == "body_too_large"
    assert ex.tasks_after == ex.tasks_before
    [delivery] = ex.deliveries
    assert (delivery.verdict, delivery.reason, delivery.raw_body) == (
        "rejected",
        "body_too_large",
        b"",
    )


@pytest.mark.parametrize("declared", ["-5", "abc", "1.5", " "])
def test_garbage_content_length_is_a_4xx(client: FlaskClient, db: Session, declared: str) -> None:
    ex = send(client, db, signed(), environ_overrides={"CONTENT_LENGTH": declared})
    assert ex.status < 500, ex.describe()
    if ex.status >= 400:
        error_of(ex)
        assert ex.tasks_after == ex.tasks_before


def test_chunked_valid_body_is_applied(client: FlaskClient, db: Session) -> None:
    assert_applied(send_chunked(client, db, json.dumps(signed()).encode()))


def test_chunked_broken_body_is_refused_and_recorded(client: FlaskClient, db: Session) -> None:
    ex = send_chunked(client, db, b'{"Event": "transcode_start", ')
    assert_refused(ex, status=400, code="invalid_json", mentions=("JSON",))


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 500_000])
def test_chunked_body_over_64_kib_is_413(client: FlaskClient, db: Session, size: int) -> None:
    ex = send_chunked(client, db, padded(signed(), size))
    assert_refused(ex, status=413, code="body_too_large", mentions=(str(MAX_BODY_BYTES),))


def test_chunked_body_on_a_server_that_does_not_terminate_it(
    client: FlaskClient, db: Session
) -> None:
    """Werkzeug then refuses to read an unbounded stream: a 4xx, never a hang or a 5xx."""
    ex = send_chunked(client, db, json.dumps(signed()).encode(), terminated=False)
    assert ex.status < 500, ex.describe()
    assert 400 <= ex.status < 500, ex.describe()
    code, _ = error_of(ex)
    assert ex.tasks_after == ex.tasks_before
    [delivery] = ex.deliveries  # what the app saw: nothing
    assert (delivery.verdict, delivery.reason, delivery.raw_body) == ("rejected", code, b"")


def test_chunked_body_over_64_kib_is_not_cut_down_to_a_valid_callback(
    client: FlaskClient, db: Session
) -> None:
    """A body is judged whole: 64 KiB of valid callback and more after it is too large."""
    valid = json.dumps(signed()).encode()
    body = valid + b" " * (MAX_BODY_BYTES - len(valid)) + b"trailing junk past the cap"
    ex = send_chunked(client, db, body)
    assert_refused(ex, status=413, code="body_too_large", mentions=(str(MAX_BODY_BYTES),))


# --- 2. explicit cases: single fields ---------------------------------------------------

REQUIRED: list[tuple[str, str, str]] = [
    # (event, path, field)
    (START, ROOT, "Event"),
    (STOP, ROOT, "Event"),
    *[(START, ROOT, f) for f in ("TaskId", "Appid", "Timestamp", "Nonce", "Signature")],
    *[(START, ROOT, f) for f in ("UserId", "Status")],
    (STOP, ROOT, "StopReason"),
    *[(STOP, ROOT, f) for f in ("TaskId", "Appid", "Timestamp", "Nonce", "Signature")],
    *[(START, f"{ROOT}/{START}", f) for f in ("TaskId", "UserId", "Status", "Nonce")],
    *[(STOP, f"{ROOT}/{STOP}", f) for f in ("TaskId", "StopReason", "Timestamp")],
]


@pytest.mark.parametrize(("event", "path", "name"), REQUIRED)
def test_missing_required_field(
    client: FlaskClient, db: Session, event: str, path: str, name: str
) -> None:
    for absence in (DELETE, None, ""):  # left out, null, or empty: all the same
        ex = send(client, db, signed(event, **{name: absence}), path)
        assert_refused(ex, status=400, code="missing_field", mentions=(name,))


def test_event_may_be_missing_when_the_path_names_it(client: FlaskClient, db: Session) -> None:
    assert_applied(send(client, db, signed(START, Event=DELETE), f"{ROOT}/{START}"))


NOT_TEXT = [True, False, [], ["x"], {}, {"a": 1}, 1.5]
NOT_INTEGER = [True, [], [1], {}, "abc", "1.5", 1.5, "-1", "1e3", " ", "\u0663", "0x10"]
WRONG_TYPES: list[tuple[str, str, list[Any]]] = [
    # (event, field, values that must each be refused naming the field)
    (START, "Event", [*NOT_TEXT, "transcode_begin", 7]),
    (START, "TaskId", [*NOT_TEXT, "t" * 257]),
    (START, "UserId", [*NOT_TEXT, "u" * 257]),
    (STOP, "UserId", NOT_TEXT),
    (START, "Nonce", [*NOT_TEXT, "n" * 129]),
    (START, "Signature", [*NOT_TEXT, "s" * 129]),
    (START, "Status", [*NOT_TEXT, "Running", "TranscodeStopped", 1]),
    (STOP, "Status", [*NOT_TEXT, "s" * 33]),
    (START, "Appid", [*NOT_INTEGER, -1, 2**32]),
    (START, "Timestamp", [*NOT_INTEGER, -1]),
    (START, "Sequence", [*NOT_INTEGER, -1, 2.5]),
    (STOP, "StopReason", [*NOT_INTEGER, -1, 2, 0.5]),
    (START, "Details", [[], "x", 1, True, [{"Input": {}}]]),
]


@pytest.mark.parametrize(("event", "name", "values"), WRONG_TYPES)
def test_wrong_type_names_the_field(
    client: FlaskClient, db: Session, event: str, name: str, values: list[Any]
) -> None:
    for value in values:
        ex = send(client, db, signed(event, **{name: value}))
        assert_refused(ex, status=400, code="invalid_field", mentions=(name,))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Input", "x"),
        ("Input", []),
        ("Input", 1),
        ("Outputs", {}),
        ("Outputs", "x"),
        ("Outputs", [1]),
        ("Outputs", [[]]),
        ("Outputs", [{"StreamId": "o"}, None]),
    ],
)
def test_wrong_type_inside_details_names_the_field(
    client: FlaskClient, db: Session, name: str, value: Any
) -> None:
    ex = send(client, db, signed(Details={name: value}))
    assert_refused(ex, status=400, code="invalid_field", mentions=(f"Details.{name}",))


@pytest.mark.parametrize(
    ("event", "name", "value"),
    [
        (START, "Sequence", 2**63),
        (START, "Sequence", 2**64),
        (START, "Sequence", str(2**63)),
        (START, "Sequence", "9" * 40),
        (START, "Sequence", 1e19),
        (START, "Timestamp", 2**63),
        (START, "Timestamp", str(2**63)),
        (START, "Appid", 2**63),
        (START, "Appid", 2**64 + 1234567),
        (STOP, "StopReason", 2**63),
        (STOP, "StopReason", 2**64),
    ],
)
def test_number_over_int64_is_refused(
    client: FlaskClient, db: Session, event: str, name: str, value: Any
) -> None:
    ex = send(client, db, signed(event, **{name: value}))
    assert_refused(ex, status=400, code="invalid_field", mentions=(name,))


def test_number_too_long_to_parse_is_refused(client: FlaskClient, db: Session) -> None:
    raw = json.dumps(signed()).replace('"Sequence": 1', '"Sequence": ' + "9" * 5000)
    assert_refused(send(client, db, raw), status=400, code="invalid_json")


@pytest.mark.parametrize("value", [-1, -(2**63), "-1", -0.5])
def test_negative_sequence_is_refused(client: FlaskClient, db: Session, value: Any) -> None:
    ex = send(client, db, signed(Sequence=value))
    assert_refused(ex, status=400, code="invalid_field", mentions=("Sequence",))


@pytest.mark.parametrize("value", [0, MAX_CALLBACK_SEQUENCE, "2", 3.0])
def test_boundary_sequences_are_accepted(client: FlaskClient, db: Session, value: Any) -> None:
    assert_applied(send(client, db, signed(Sequence=value)))


@pytest.mark.parametrize("value", [MAX_CALLBACK_SEQUENCE + 1, 2**63 - 1])
def test_sequences_that_leave_no_room_for_our_stops_are_refused(
    client: FlaskClient, db: Session, value: int
) -> None:
    """Each stop attempt takes max_seq + 1: a callback may not bring a BIGINT's last values."""
    ex = send(client, db, signed(Sequence=value))
    assert_refused(ex, status=400, code="invalid_field", mentions=("Sequence",))


def test_fractional_timestamp_is_refused(client: FlaskClient, db: Session) -> None:
    body = signed()
    body["Timestamp"] = int(body["Timestamp"]) + 0.5
    ex = send(client, db, body)
    assert_refused(ex, status=400, code="invalid_field", mentions=("Timestamp",))


def test_float_timestamp_does_not_match_the_signed_text(client: FlaskClient, db: Session) -> None:
    """1700000000.0 is not the text "1700000000" that was signed."""
    body = signed()
    body["Timestamp"] = float(body["Timestamp"])
    code, message = assert_refused(send(client, db, body))
    assert code in ("invalid_field", "invalid_signature"), message


@pytest.mark.parametrize("token", ["1e999", "-1e999", "1e300", "1700000000.000001"])
def test_float_timestamp_out_of_range_or_fractional(
    client: FlaskClient, db: Session, token: str
) -> None:
    raw = json.dumps(signed(Timestamp="__TS__")).replace('"__TS__"', token)
    code, _ = assert_refused(send(client, db, raw), status=400)
    assert code in ("invalid_field", "invalid_json")


# --- characters that JSON carries but the database cannot -----------------------------

TEXT_FIELDS = [(START, "TaskId"), (START, "UserId"), (START, "Nonce"), (STOP, "Status")]


@pytest.mark.parametrize(("event", "name"), [*TEXT_FIELDS, (START, "Signature")])
@pytest.mark.parametrize("char", [chr(0xD800), chr(0xDFFF)], ids=["high", "low"])
def test_lone_surrogate_in_a_text_field_is_400(
    client: FlaskClient, db: Session, event: str, name: str, char: str
) -> None:
    """JSON's "\\ud800" escape decodes to a str that cannot be encoded as UTF-8."""
    body = signed(event)
    body[name] = f"x{char}y"
    ex = send(client, db, body)  # json.dumps writes the escape, so the bytes are ASCII
    assert_refused(ex, status=400, code="invalid_field", mentions=(name,))


@pytest.mark.parametrize(("event", "name"), TEXT_FIELDS)
def test_nul_in_a_text_field_is_400(
    client: FlaskClient, db: Session, event: str, name: str
) -> None:
    """PostgreSQL text cannot hold NUL; the answer must not depend on the database."""
    body = signed(event)
    body[name] = "a\x00b"
    if name == "Nonce":  # sign it, so that the NUL is the only thing wrong
        body["Signature"] = callback_signature(CALLBACK_SECRET, body["Timestamp"], body["Nonce"])
    ex = send(client, db, body)
    assert_refused(ex, status=400, code="invalid_field", mentions=(name,))


@pytest.mark.parametrize("char", ["\x00", "\ud800"], ids=["nul", "surrogate"])
@pytest.mark.parametrize("name", ["TaskId", "UserId"])
def test_bad_characters_with_a_bad_signature_are_recorded(
    client: FlaskClient, db: Session, char: str, name: str
) -> None:
    """The refusal is recorded even when what could be read cannot be stored."""
    body = signed(Signature="0" * 40)
    body[name] = f"x{char}y"
    assert_refused(send(client, db, body))


@pytest.mark.parametrize("char", ["\x00", "\ud800", "\u2028", "\ufeff"])
def test_awkward_characters_inside_details_are_not_a_5xx(
    client: FlaskClient, db: Session, char: str
) -> None:
    body = signed(Details={"Input": {"StreamId": f"in{char}", f"k{char}": 1}})
    assert_no_server_error(send(client, db, body))


def test_nul_bytes_in_random_bytes_are_recorded_as_sent(client: FlaskClient, db: Session) -> None:
    body = bytes(range(256)) * 4 + b"\x00\x00\xff"
    ex = send(client, db, body, content_type="application/octet-stream")
    assert_refused(ex, status=400, code="invalid_encoding")
    assert ex.deliveries[0].raw_body == body


def test_only_the_first_16_kib_of_a_rejected_body_is_kept(client: FlaskClient, db: Session) -> None:
    body = b"\x00\xff" * 20_000
    ex = send(client, db, body)
    assert_refused(ex, status=400, code="invalid_encoding")
    assert ex.deliveries[0].raw_body == body[:STORED_BODY_BYTES]


def test_details_nested_up_to_the_recursion_limit(client: FlaskClient, db: Session) -> None:
    """Nesting that the JSON parser accepts must not fail later, when it is stored."""
    limit = sys.getrecursionlimit()
    failures = []
    for depth in range(max(1, limit - 250), limit + 10, 2):
        inner = "[" * depth + "]" * depth
        body = signed(Details={"Input": {"Deep": "__DEEP__"}})
        raw = json.dumps(body).replace('"__DEEP__"', inner)
        ex = send(client, db, raw)
        if ex.status >= 500:
            failures.append((depth, ex.status, ex.json))
        else:
            assert_no_server_error(ex)
    assert not failures, failures
