"""Body decoding and field validation of callbacks, without the database."""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

import pytest

from manager.zego.callbacks import CallbackError, MalformedCallback, decode_body, parse_callback

START = {
    "Event": "transcode_start",
    "Appid": "111111",
    "Timestamp": "1470820198",
    "Nonce": "123412",
    "Signature": "5bd59fd62953a8059fb7eaba95720f66d19e4517",
    "TaskId": "2222",
    "UserId": "2222",
    "Sequence": 0,
    "Status": "TranscodeStarted",
    "Details": {
        "Input": {"StreamId": "2222"},
        "Outputs": [{"StreamId": "2222", "Width": 1280, "Height": 720, "GOP": 2}],
    },
}


def test_plain_json() -> None:
    assert decode_body(json.dumps(START).encode()) == START


def test_percent_encoded_json() -> None:
    assert decode_body(quote(json.dumps(START)).encode()) == START


def test_percent_encoded_json_with_plus_for_spaces() -> None:
    encoded = urlencode({"x": json.dumps(START)})[2:]  # quote_plus style
    assert decode_body(encoded.encode()) == START


def test_form_field_holding_json() -> None:
    body = urlencode({"data": json.dumps(START)}).encode()
    assert decode_body(body, "application/x-www-form-urlencoded") == START


def test_form_with_one_field_per_key() -> None:
    flat = {k: v for k, v in START.items() if k != "Details"}
    decoded = decode_body(urlencode(flat).encode())
    cb = parse_callback(decoded)
    assert cb.task_id == "2222"
    assert cb.sequence == 0
    assert cb.app_id == 111111


def test_numbers_as_strings_and_strings_as_numbers() -> None:
    body = dict(START, Appid=111111, Timestamp=1470820198, Nonce=123412, Sequence="7", TaskId=42)
    cb = parse_callback(body)
    assert (cb.app_id, cb.timestamp, cb.nonce, cb.sequence, cb.task_id) == (
        111111,
        1470820198,
        "123412",
        7,
        "42",
    )
    assert cb.timestamp_text == "1470820198"


def test_lowercase_keys_are_accepted() -> None:
    body = {
        k.lower() if k in ("Timestamp", "Nonce", "Signature") else k: v for k, v in START.items()
    }
    cb = parse_callback(body)
    assert cb.nonce == "123412"


def test_missing_sequence_counts_as_zero() -> None:
    body = {k: v for k, v in START.items() if k != "Sequence"}
    cb = parse_callback(body)
    assert cb.sequence == 0
    assert not cb.sequence_given


def test_stop_with_started_status_is_still_a_stop() -> None:
    # The reference's own stop example carries Status "TranscodeStarted".
    body = dict(START, Event="transcode_stop", StopReason=0)
    del body["Details"]
    cb = parse_callback(body)
    assert cb.is_stop
    assert cb.stop_reason == 0


def test_event_can_come_from_the_path() -> None:
    body = {k: v for k, v in START.items() if k != "Event"}
    assert parse_callback(body, "transcode_start").event == "transcode_start"
    with pytest.raises(CallbackError) as err:
        parse_callback(START, "transcode_stop")
    assert isinstance(err.value, MalformedCallback)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "empty_body"),
        (b"   ", "empty_body"),
        (b"\xff\xfe\x00", "invalid_encoding"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b"%7Bbroken", "invalid_json"),
        (b"just words", "invalid_body"),
        (b"a=1&&&b", "invalid_body"),
        (b"{" * 100000, "invalid_json"),
    ],
)
def test_undecodable_bodies(raw: bytes, code: str) -> None:
    with pytest.raises(CallbackError) as err:
        decode_body(raw)
    assert isinstance(err.value, MalformedCallback)
    assert err.value.code in (code, "invalid_json")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"TaskId": None}, "TaskId"),
        ({"Timestamp": None}, "Timestamp"),
        ({"Nonce": None}, "Nonce"),
        ({"Signature": None}, "Signature"),
        ({"Appid": None}, "Appid"),
        ({"UserId": None}, "UserId"),
        ({"Status": None}, "Status"),
        ({"Event": "transcode_pause"}, "Event"),
        ({"Status": "TranscodeStopped"}, "Status"),
        ({"Sequence": "seven"}, "Sequence"),
        ({"Sequence": -1}, "Sequence"),
        ({"Sequence": 1.5}, "Sequence"),
        ({"Sequence": True}, "Sequence"),
        ({"Timestamp": "12:00"}, "Timestamp"),
        ({"Appid": 2**33}, "Appid"),
        ({"TaskId": ["a"]}, "TaskId"),
        ({"TaskId": "x" * 300}, "TaskId"),
        ({"Details": "none"}, "Details"),
        ({"Details": {"Outputs": [1, 2]}}, "Details.Outputs"),
        ({"Details": {"Input": "s"}}, "Details.Input"),
    ],
)
def test_bad_fields_are_named(change: dict[str, object], field: str) -> None:
    body = dict(START)
    for key, value in change.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    with pytest.raises(CallbackError) as err:
        parse_callback(body)
    assert isinstance(err.value, MalformedCallback)
    assert field in err.value.message


def test_stop_needs_a_valid_stop_reason() -> None:
    body = dict(START, Event="transcode_stop", StopReason=2)
    with pytest.raises(CallbackError) as err:
        parse_callback(body)
    assert "StopReason" in err.value.message


def test_a_byte_order_mark_in_front_of_json_is_ignored() -> None:
    body = {"Event": "transcode_start", "TaskId": "t"}
    assert decode_body(b"\xef\xbb\xbf" + json.dumps(body).encode()) == body
