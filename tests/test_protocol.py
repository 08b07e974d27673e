"""Sans-IO tests of gochat.protocol: bytes in, messages out, and back (PROTOCOL.md 1, 3, 6, 7).

No sockets. Every valid stream is also fed one byte at a time and in random chunkings, as
nats-server's parser_test.go does, because a real TCP peer may split bytes anywhere.
"""
import dataclasses
import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gochat.protocol import (
    ERRORS,
    FRAME_MAGIC,
    NEED_DATA,
    Bye,
    Codec,
    Decoder,
    Dm,
    Hello,
    History,
    Join,
    Leave,
    Msg,
    Outgoing,
    Ping,
    Pong,
    ProtocolError,
    Rooms,
    Who,
    encode,
    encode_frame,
    encode_frame_request,
    encode_json,
    encode_text,
    error_message,
    parse_request,
    parse_text_line,
    render_text,
)

MAX_TEXT = 4096
REQUEST_TYPES = (Hello, Join, Leave, Msg, Dm, Who, Rooms, History, Ping, Pong, Bye)
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- helpers


def decode_chunks(chunks, max_frame_bytes=1024, codec=None):
    """Feed ``chunks`` and collect every event; a ProtocolError becomes ("error", code).

    Decoding stops at an error that closes the connection, as the server would.
    """
    decoder = Decoder(max_frame_bytes, codec)
    events = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while True:
            try:
                event = decoder.next_event()
            except ProtocolError as exc:
                events.append(("error", exc.code))
                if exc.closes:
                    return events
                continue
            if event is NEED_DATA:
                break
            events.append(event)
    return events


def byte_by_byte(data):
    return [data[i : i + 1] for i in range(len(data))]


def random_chunks(data, rng):
    """``data`` cut at random places, with an occasional empty chunk thrown in."""
    chunks, pos = [], 0
    while pos < len(data):
        size = rng.choice((0, 1, 2, 3, 5, 8, 13, rng.randint(1, len(data))))
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def chunkings(data, seeds=20):
    yield [data]
    yield byte_by_byte(data)
    for seed in range(seeds):
        yield random_chunks(data, random.Random(seed))


def assert_decodes(data, expected, max_frame_bytes=1024, codec=None):
    """The same events come out however ``data`` is split."""
    for chunks in chunkings(data):
        assert decode_chunks(chunks, max_frame_bytes, codec) == expected, chunks


def frame(payload, crc=None, length=None):
    """A raw frame; ``crc`` or ``length`` override the correct values to build broken ones."""
    return struct.pack(">II", len(payload) if length is None else length,
                       zlib.crc32(payload) if crc is None else crc) + payload


def split_at(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


# ---------------------------------------------------------------- error table (section 6)

# Transcribed from PROTOCOL.md section 6: does the error close the connection?
# shutting_down closes only when the drain ends, not because of the error itself.
SECTION_6_CLOSES = {
    "bad_json": False,
    "bad_request": False,
    "unknown_type": False,
    "bad_checksum": False,
    "hello_required": False,
    "bad_nick": False,
    "nick_taken": False,
    "bad_session": False,
    "unsupported_version": False,
    "auth_failed": True,
    "not_in_room": False,
    "no_such_user": False,
    "bad_room": False,
    "too_many_rooms": False,
    "rate_limited": False,
    "too_large": True,
    "too_many_connections": True,
    "slow_consumer": True,
    "idle_timeout": True,
    "handshake_timeout": True,
    "unavailable": False,
    "shutting_down": False,
}


def test_error_table_has_exactly_the_codes_of_section_6():
    assert set(ERRORS) == set(SECTION_6_CLOSES)


@pytest.mark.parametrize("code", sorted(SECTION_6_CLOSES))
def test_error_closes_matches_section_6(code):
    assert ERRORS[code].closes is SECTION_6_CLOSES[code]
    assert ProtocolError(code).closes is SECTION_6_CLOSES[code]


@pytest.mark.parametrize("code", sorted(SECTION_6_CLOSES))
def test_every_code_has_a_default_message(code):
    exc = ProtocolError(code)
    assert exc.message == ERRORS[code].message
    assert exc.message
    assert exc.to_message() == {"type": "error", "code": code, "message": ERRORS[code].message}


def test_error_message_echoes_the_request_id_only_when_given():
    assert error_message("not_in_room", "not in dev", "c1") == {
        "type": "error", "code": "not_in_room", "message": "not in dev", "id": "c1"}
    assert error_message("not_in_room", request_id=0)["id"] == 0
    assert "id" not in error_message("not_in_room")
    assert ProtocolError("rate_limited", "slow down", 7).to_message()["id"] == 7


def test_unknown_error_code_is_a_programming_error():
    with pytest.raises(KeyError):
        ProtocolError("no_such_code")


# ---------------------------------------------------------------- codec detection (section 1)


def test_nothing_received_decides_nothing():
    decoder = Decoder(1024)
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"")
    assert decoder.next_event() is NEED_DATA
    assert decoder.codec is None


def test_gcf1_prefix_arriving_byte_by_byte_waits_then_selects_frames():
    decoder = Decoder(1024)
    for byte in b"GCF":
        decoder.receive_data(bytes([byte]))
        assert decoder.next_event() is NEED_DATA
        assert decoder.codec is None
    decoder.receive_data(b"1")
    assert decoder.next_event() is NEED_DATA
    assert decoder.codec is Codec.FRAMES
    assert decoder.buffered == 0  # the magic is consumed, not part of the first frame
    decoder.receive_data(encode_frame({"type": "ping", "ts": 1}))
    assert decoder.next_event() == {"type": "ping", "ts": 1}


@pytest.mark.parametrize("first", [b"{", b" {", b"\t\r\n {", b"\n\n\n{", b"\r\n{"])
def test_first_non_blank_brace_selects_json(first):
    decoder = Decoder(1024)
    decoder.receive_data(first)
    assert decoder.next_event() is NEED_DATA
    assert decoder.codec is Codec.JSON


@pytest.mark.parametrize("first", [b"Gary\n", b"GCX", b"GC ", b"G\n", b"alice", b"/token x", b"[1]", b"gcf1"])
def test_anything_else_selects_text(first):
    decoder = Decoder(1024)
    decoder.receive_data(first)
    decoder.next_event()
    assert decoder.codec is Codec.TEXT


def test_gary_is_a_nick_not_a_broken_magic():
    assert_decodes(b"Gary\n", ["Gary"])


def test_strict_prefix_then_other_byte_is_text():
    decoder = Decoder(1024)
    decoder.receive_data(b"GC")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"x\n")
    assert decoder.next_event() == "GCx"
    assert decoder.codec is Codec.TEXT


@pytest.mark.parametrize("data", [b"\nGCF1hi\n", b" GCF1hi\n", b"\r\n\tGCF1hi\n"])
def test_magic_after_blanks_is_text_however_chunked(data):
    """Section 1: frames need exactly GCF1 as the first bytes; what follows blanks is text.

    (This used to depend on chunking: a lone blank chunk, then GCF1, selected frames.)
    """
    assert_decodes(data, ["GCF1hi"])


def test_only_blanks_forever_keeps_the_buffer_bounded():
    decoder = Decoder(1024)
    for _ in range(2000):
        decoder.receive_data(b" \t\r\n" * 64)
        assert decoder.next_event() is NEED_DATA
        assert decoder.buffered == 0
        # what the decoder holds in memory, not just what it still owes
        assert len(decoder._buf) <= 256
    assert decoder.codec is None
    decoder.receive_data(b'{"type":"bye"}\n')
    assert decoder.next_event() == {"type": "bye"}


def test_explicit_codec_skips_detection():
    """The client library knows the codec: server frames come without the magic."""
    decoder = Decoder(1024, codec=Codec.FRAMES)
    decoder.receive_data(encode_frame({"type": "welcome"}))
    assert decoder.next_event() == {"type": "welcome"}
    text = Decoder(1024, codec=Codec.TEXT)
    text.receive_data(b"{not json}\n")
    assert text.next_event() == "{not json}"


# ---------------------------------------------------------------- json lines


def test_json_single_line():
    assert_decodes(b'{"type":"ping","ts":1}\n', [{"type": "ping", "ts": 1}])


def test_json_crlf_terminator():
    assert_decodes(b'{"type":"ping","ts":1}\r\n', [{"type": "ping", "ts": 1}])


def test_json_blank_lines_are_skipped():
    data = b'\n\r\n{"type":"a"}\n\n \t \r\n\r\n{"type":"b"}\r\n   \n'
    assert_decodes(data, [{"type": "a"}, {"type": "b"}])


def test_json_several_messages_in_one_chunk():
    lines = [{"type": "msg", "room": "lobby", "text": f"m{i}", "id": i} for i in range(50)]
    assert_decodes(b"".join(encode_json(m) for m in lines), lines)


def test_json_message_split_across_chunks_waits_for_the_newline():
    decoder = Decoder(1024)
    decoder.receive_data(b'{"type":"msg","ro')
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b'om":"lobby","text":"hi"}')
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"\n")
    assert decoder.next_event() == {"type": "msg", "room": "lobby", "text": "hi"}
    assert decoder.next_event() is NEED_DATA
    assert decoder.buffered == 0


def test_json_unicode_and_unknown_fields_survive():
    message = {"type": "msg", "room": "lobby", "text": "héllo 😀 / \u2028", "future": [1, {"x": None}]}
    assert_decodes(encode_json(message), [message])


def test_json_partial_line_is_buffered_not_lost():
    decoder = Decoder(1024)
    decoder.receive_data(b'{"type":"a"}\n{"type"')
    assert decoder.next_event() == {"type": "a"}
    assert decoder.next_event() is NEED_DATA
    assert decoder.buffered == len(b'{"type"')


# ---------------------------------------------------------------- frames


def test_frame_round_trip():
    message = {"type": "msg", "room": "lobby", "text": "hi", "id": "c1"}
    assert_decodes(encode_frame_request(message), [message])


def test_frame_layout_is_length_crc_payload_big_endian():
    data = encode_frame({"type": "ping"})
    length, crc = struct.unpack(">II", data[:8])
    payload = data[8:]
    assert length == len(payload)
    assert crc == zlib.crc32(payload)
    assert payload == b'{"type":"ping"}'
    assert encode_frame_request({"type": "ping"}) == FRAME_MAGIC + data


def test_several_frames_any_chunking():
    messages = [{"type": "msg", "room": "r", "text": "x" * i, "id": i} for i in range(30)]
    data = FRAME_MAGIC + b"".join(encode_frame(m) for m in messages)
    assert_decodes(data, messages)


def test_frame_payload_may_contain_newlines_and_blanks():
    message = {"type": "msg", "room": "r", "text": "line\none\r\n"}
    payload = b'\n {"type":"msg","room":"r","text":"line\\none\\r\\n"}\n'  # JSON allows outer blanks
    assert_decodes(FRAME_MAGIC + frame(payload), [message])


def test_frame_of_exactly_max_frame_bytes_is_accepted():
    payload = b'{"type":"' + b"x" * (200 - 11) + b'"}'
    assert len(payload) == 200
    assert_decodes(FRAME_MAGIC + frame(payload), [{"type": "x" * 189}], max_frame_bytes=200)
    assert_decodes(FRAME_MAGIC + frame(payload), [("error", "too_large")], max_frame_bytes=199)


def test_frame_waits_for_the_whole_payload():
    decoder = Decoder(1024)
    data = encode_frame_request({"type": "bye"})
    decoder.receive_data(data[:-1])
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(data[-1:])
    assert decoder.next_event() == {"type": "bye"}
    assert decoder.buffered == 0


# ---------------------------------------------------------------- text lines


def test_text_lines():
    data = b"alice\r\n/join dev\n\n  \r\nhello world\n"
    assert_decodes(data, ["alice", "/join dev", "hello world"])


def test_text_keeps_inner_and_later_leading_spaces():
    """Leading blanks are dropped only while the codec is unknown; parse_text_line strips later."""
    assert_decodes(b"  bob\n  hi there \n", ["bob", "  hi there "])


def test_text_utf8():
    assert_decodes("zoë\nça va? 😀\n".encode(), ["zoë", "ça va? 😀"])


def test_text_invalid_utf8_is_bad_request_and_the_stream_continues():
    assert_decodes(b"alice\n\xff\xfe\nok\n", ["alice", ("error", "bad_request"), "ok"])


# ---------------------------------------------------------------- decoding errors


@pytest.mark.parametrize("line", [
    b"{not json}",
    b'{"type":"a"',
    b'{"type":"a"} trailing',
    b'{"type":"a",}',
    b"{'type':'a'}",
])
def test_bad_json_is_reported_and_the_connection_stays(line):
    data = line + b'\n{"type":"next"}\n'
    assert_decodes(data, [("error", "bad_json"), {"type": "next"}])


def test_invalid_utf8_json_is_bad_json():
    data = b'{"type":"msg","text":"\xc3\x28"}\n{"type":"next"}\n'
    assert_decodes(data, [("error", "bad_json"), {"type": "next"}])


@pytest.mark.parametrize("value", [b"[1,2]", b'"type"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_bad_json(value):
    """Only the first line decides the codec, so later lines may start with anything."""
    data = b'{"type":"first"}\n' + value + b'\n{"type":"next"}\n'
    assert_decodes(data, [{"type": "first"}, ("error", "bad_json"), {"type": "next"}])
    frames = FRAME_MAGIC + frame(value) + encode_frame({"type": "next"})
    assert_decodes(frames, [("error", "bad_json"), {"type": "next"}])


def test_deeply_nested_json_is_bad_json():
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    data = deep + b'\n{"type":"next"}\n'
    assert decode_chunks([data], max_frame_bytes=1 << 20) == [("error", "bad_json"), {"type": "next"}]
    frames = FRAME_MAGIC + frame(deep) + encode_frame({"type": "next"})
    assert decode_chunks([frames], max_frame_bytes=1 << 20) == [("error", "bad_json"), {"type": "next"}]


def test_bad_json_error_carries_no_request_id_and_stays():
    decoder = Decoder(1024)
    decoder.receive_data(b"{oops\n")
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()
    assert info.value.code == "bad_json"
    assert info.value.request_id is None
    assert not info.value.closes


def test_empty_frame_is_bad_json():
    assert_decodes(FRAME_MAGIC + frame(b"") + encode_frame({"type": "x"}), [("error", "bad_json"), {"type": "x"}])


def test_json_line_over_the_limit_is_too_large_before_its_newline():
    decoder = Decoder(64)
    decoder.receive_data(b"{" + b"x" * 63)  # exactly 64 bytes: still allowed
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"x")  # 65 bytes and no newline: reject now, do not wait for more
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()
    assert info.value.code == "too_large"
    assert info.value.closes


def test_json_line_over_the_limit_in_one_chunk_is_too_large():
    assert_decodes(b'{"type":"a"}\n{' + b"x" * 100 + b"}\n", [{"type": "a"}, ("error", "too_large")],
                   max_frame_bytes=64)


def test_line_of_exactly_the_limit_is_accepted_with_crlf():
    line = b'{"type":"' + b"x" * (64 - 11) + b'"}'
    assert len(line) == 64
    expected = [{"type": "x" * 53}]
    assert_decodes(line + b"\r\n", expected, max_frame_bytes=64)
    assert_decodes(line + b"\n", expected, max_frame_bytes=64)


def test_cr_at_the_limit_waits_for_a_possible_lf():
    decoder = Decoder(64)
    decoder.receive_data(b"{" + b"x" * 63 + b"\r")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"y")  # not a CRLF after all: the line is 66 bytes
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()
    assert info.value.code == "too_large"


def test_text_line_over_the_limit_is_too_large():
    assert_decodes(b"alice\n" + b"y" * 65, ["alice", ("error", "too_large")], max_frame_bytes=64)


def test_blank_run_after_codec_is_a_line_and_bounded():
    assert_decodes(b'{"type":"a"}\n' + b" " * 65, [{"type": "a"}, ("error", "too_large")], max_frame_bytes=64)


def test_frame_header_over_the_limit_is_too_large_from_the_header_alone():
    decoder = Decoder(1024)
    decoder.receive_data(FRAME_MAGIC + struct.pack(">II", 1025, 0))  # no payload sent at all
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()
    assert info.value.code == "too_large"
    assert info.value.closes


def test_frame_header_of_4_gib_is_too_large_byte_by_byte():
    data = FRAME_MAGIC + struct.pack(">II", 0xFFFFFFFF, 0)
    assert_decodes(data, [("error", "too_large")])


def test_bad_checksum_drops_the_frame_and_keeps_the_stream_in_sync():
    good = b'{"type":"msg","room":"r","text":"hi"}'
    data = (FRAME_MAGIC + encode_frame({"type": "first"})
            + frame(good, crc=zlib.crc32(good) ^ 1)
            + encode_frame({"type": "next"}))
    assert_decodes(data, [{"type": "first"}, ("error", "bad_checksum"), {"type": "next"}])


def test_corrupted_payload_byte_is_bad_checksum():
    data = bytearray(encode_frame({"type": "msg", "text": "hello"}))
    data[12] ^= 0x20
    assert_decodes(FRAME_MAGIC + bytes(data) + encode_frame({"type": "next"}),
                   [("error", "bad_checksum"), {"type": "next"}])


def test_bad_checksum_error_stays_open():
    decoder = Decoder(1024, codec=Codec.FRAMES)
    decoder.receive_data(frame(b"{}", crc=0))
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()
    assert info.value.code == "bad_checksum"
    assert not info.value.closes


# ---------------------------------------------------------------- request validation (sections 2, 3)

VALID_REQUESTS = [
    ({"type": "hello", "v": 1, "nick": "alice"}, Hello(None, "alice", None, None)),
    ({"type": "hello", "nick": "A-z_0.9"}, Hello(None, "A-z_0.9", None, None)),  # absent v means 1
    ({"type": "hello", "nick": "n" * 32}, Hello(None, "n" * 32, None, None)),
    ({"type": "hello", "token": "a.b.c"}, Hello(None, None, "a.b.c", None)),
    ({"type": "hello", "resume": "s3cret", "id": "h"}, Hello("h", None, None, "s3cret")),
    ({"type": "join", "room": "lobby"}, Join(None, "lobby", None)),
    ({"type": "join", "room": "lobby", "since": 0}, Join(None, "lobby", 0)),
    ({"type": "join", "room": "a.b:c-d_E9", "since": 41}, Join(None, "a.b:c-d_E9", 41)),
    ({"type": "join", "room": "r" * 64}, Join(None, "r" * 64, None)),
    ({"type": "leave", "room": "lobby", "id": "l1"}, Leave("l1", "lobby")),
    ({"type": "msg", "room": "lobby", "text": "hi", "id": "c1"}, Msg("c1", "lobby", "hi")),
    ({"type": "msg", "room": "lobby", "text": ""}, Msg(None, "lobby", "")),
    ({"type": "dm", "to": "bob", "text": "hi", "id": "c2"}, Dm("c2", "bob", "hi")),
    ({"type": "who", "room": "lobby"}, Who(None, "lobby")),
    ({"type": "rooms"}, Rooms(None)),
    ({"type": "rooms", "future": {"x": [1, 2]}, "more": None}, Rooms(None)),  # unknown fields ignored
    ({"type": "history", "room": "lobby"}, History(None, "lobby", 0, None)),
    ({"type": "history", "room": "lobby", "since": 5, "limit": 10}, History(None, "lobby", 5, 10)),
    ({"type": "ping", "ts": 1700000000000}, Ping(None, 1700000000000)),
    ({"type": "ping", "ts": 1.5}, Ping(None, 1.5)),
    ({"type": "ping", "ts": "t-1"}, Ping(None, "t-1")),
    ({"type": "ping"}, Ping(None, None)),
    ({"type": "pong", "ts": 7}, Pong(None, 7)),
    ({"type": "bye"}, Bye(None)),
]


@pytest.mark.parametrize("obj, expected", VALID_REQUESTS)
def test_valid_request(obj, expected):
    assert parse_request(obj, MAX_TEXT) == expected


def test_requests_are_frozen():
    request = parse_request({"type": "msg", "room": "lobby", "text": "hi"}, MAX_TEXT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.room = "dev"


def test_valid_request_decoded_from_the_wire():
    decoder = Decoder(1024)
    decoder.receive_data(b'{"type":"msg","room":"lobby","text":"hi","id":"c1"}\n')
    assert parse_request(decoder.next_event(), MAX_TEXT) == Msg("c1", "lobby", "hi")


@pytest.mark.parametrize("rid", ["", "c1", "x" * 64, "é" * 64, 0, -1, 42, 2**63 - 1, -(2**63), 2**64 - 1])
def test_valid_ids_are_kept(rid):
    assert parse_request({"type": "rooms", "id": rid}, MAX_TEXT).id == rid


def test_null_id_means_no_id():
    assert parse_request({"type": "rooms", "id": None}, MAX_TEXT).id is None


BAD_IDS = ["x" * 65, 1.5, 1.0, True, False, {}, {"a": 1}, [], ["c1"], 2**64, -(2**63) - 1, "\ud800"]


@pytest.mark.parametrize("rid", BAD_IDS)
def test_bad_id_is_bad_request_without_an_id(rid):
    with pytest.raises(ProtocolError) as info:
        parse_request({"type": "rooms", "id": rid}, MAX_TEXT)
    assert info.value.code == "bad_request"
    assert "id" in info.value.message
    assert info.value.request_id is None
    assert "id" not in info.value.to_message()


# (request, code, a word the message must contain)
BAD_REQUESTS = [
    ({}, "bad_request", "type"),
    ({"type": None}, "bad_request", "type"),
    ({"type": 5}, "bad_request", "type"),
    ({"type": ["msg"]}, "bad_request", "type"),
    ({"type": "frobnicate"}, "unknown_type", "frobnicate"),
    ({"type": "MSG", "room": "lobby", "text": "hi"}, "unknown_type", "MSG"),
    ({"type": "join"}, "bad_request", "room"),
    ({"type": "join", "room": 7}, "bad_request", "room"),
    ({"type": "join", "room": "lobby", "since": -1}, "bad_request", "since"),
    ({"type": "join", "room": "lobby", "since": 1.5}, "bad_request", "since"),
    ({"type": "join", "room": "lobby", "since": True}, "bad_request", "since"),
    ({"type": "join", "room": "lobby", "since": "3"}, "bad_request", "since"),
    ({"type": "history", "room": "lobby", "since": -5}, "bad_request", "since"),
    ({"type": "history", "room": "lobby", "limit": 0}, "bad_request", "limit"),
    ({"type": "history", "room": "lobby", "limit": "10"}, "bad_request", "limit"),
    ({"type": "msg", "room": "lobby"}, "bad_request", "text"),
    ({"type": "msg", "room": "lobby", "text": 5}, "bad_request", "text"),
    ({"type": "msg", "room": "lobby", "text": ["hi"]}, "bad_request", "text"),
    ({"type": "msg", "room": "lobby", "text": "x" * (MAX_TEXT + 1)}, "bad_request", "text"),
    ({"type": "msg", "room": "lobby", "text": "lone \ud800 surrogate"}, "bad_request", "text"),
    ({"type": "msg", "text": "hi"}, "bad_request", "room"),
    ({"type": "msg", "room": None, "text": "hi"}, "bad_request", "room"),
    ({"type": "dm", "text": "hi"}, "bad_request", "to"),
    ({"type": "dm", "to": ["bob"], "text": "hi"}, "bad_request", "to"),
    ({"type": "dm", "to": "bob", "text": "x" * (MAX_TEXT + 1)}, "bad_request", "text"),
    ({"type": "msg", "room": "no spaces", "text": "hi"}, "bad_room", "room"),
    ({"type": "join", "room": ""}, "bad_room", "room"),
    ({"type": "join", "room": "r" * 65}, "bad_room", "room"),
    ({"type": "who", "room": "a/b"}, "bad_room", "room"),
    ({"type": "leave", "room": "lobby\n"}, "bad_room", "room"),
    ({"type": "history", "room": "lobbý"}, "bad_room", "room"),
    ({"type": "hello", "nick": "has space"}, "bad_nick", "nick"),
    ({"type": "hello", "nick": ""}, "bad_nick", "nick"),
    ({"type": "hello", "nick": "n" * 33}, "bad_nick", "nick"),
    ({"type": "hello", "nick": "élan"}, "bad_nick", "nick"),
    ({"type": "hello", "nick": "a:b"}, "bad_nick", "nick"),  # ':' is for rooms only
    ({"type": "hello", "nick": 5}, "bad_request", "nick"),
    ({"type": "hello", "token": 5}, "bad_request", "token"),
    ({"type": "hello", "resume": {"s": 1}}, "bad_request", "resume"),
    ({"type": "hello"}, "bad_request", "nick"),
    ({"type": "hello", "v": 1}, "bad_request", "nick"),
    ({"type": "hello", "v": 2, "nick": "alice"}, "unsupported_version", "version"),
    ({"type": "hello", "v": 0, "nick": "alice"}, "unsupported_version", "version"),
    ({"type": "hello", "v": "1", "nick": "alice"}, "bad_request", "v"),
    ({"type": "ping", "ts": [1]}, "bad_request", "ts"),
    ({"type": "ping", "ts": float("inf")}, "bad_request", "ts"),
    ({"type": "ping", "ts": float("nan")}, "bad_request", "ts"),
    ({"type": "pong", "ts": "x" * 65}, "bad_request", "ts"),
]


@pytest.mark.parametrize("obj, code, word", BAD_REQUESTS)
def test_bad_request_codes(obj, code, word):
    with pytest.raises(ProtocolError) as info:
        parse_request(obj, MAX_TEXT)
    assert info.value.code == code
    assert word in info.value.message
    assert info.value.closes is SECTION_6_CLOSES[code]


@pytest.mark.parametrize("rid", ["r1", 7, 0])
@pytest.mark.parametrize("obj, code, word", BAD_REQUESTS)
def test_errors_echo_a_valid_id(obj, code, word, rid):
    with pytest.raises(ProtocolError) as info:
        parse_request({**obj, "id": rid}, MAX_TEXT)
    assert info.value.code == code
    assert info.value.request_id == rid
    assert info.value.to_message()["id"] == rid


@pytest.mark.parametrize("obj, code, word", BAD_REQUESTS)
def test_an_invalid_id_wins_over_every_other_error(obj, code, word):
    with pytest.raises(ProtocolError) as info:
        parse_request({**obj, "id": 1.5}, MAX_TEXT)
    assert info.value.code == "bad_request"
    assert info.value.request_id is None


def test_text_limit_counts_code_points_not_bytes():
    for char in ("x", "é", "😀"):
        assert parse_request({"type": "msg", "room": "r", "text": char * 10}, 10).text == char * 10
        with pytest.raises(ProtocolError) as info:
            parse_request({"type": "msg", "room": "r", "text": char * 11}, 10)
        assert "text" in info.value.message


def test_nick_is_not_checked_when_a_token_or_resume_decides_it():
    """With a token the nick is the token's sub; with resume it is the session's."""
    assert parse_request({"type": "hello", "token": "t", "nick": "bad nick"}, MAX_TEXT).token == "t"
    assert parse_request({"type": "hello", "resume": "s", "nick": "bad nick"}, MAX_TEXT).resume == "s"


# ---------------------------------------------------------------- encoders


def test_encode_json_is_one_utf8_line():
    message = {"type": "msg", "room": "lobby", "text": "a\nb\r\nc é/😀"}
    data = encode_json(message)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert b"\r" not in data
    assert "é/😀".encode() in data  # raw UTF-8, forward slash unescaped
    assert decode_chunks([data]) == [message]


def test_encode_dispatches_by_codec():
    message = {"type": "who", "room": "lobby", "members": ["alice", "bob"]}
    assert encode(message, Codec.JSON) == encode_json(message)
    assert encode(message, Codec.FRAMES) == encode_frame(message)
    assert encode(message, Codec.TEXT) == b"* members of lobby: alice bob\n"


def test_frames_round_trip_with_a_valid_crc():
    messages = [{"type": "history", "room": "r", "messages": [{"type": "msg", "text": "x" * 5000}]},
                {"type": "pong", "ts": 3}]
    data = b"".join(encode_frame(m) for m in messages)
    assert decode_chunks([data], max_frame_bytes=1 << 16, codec=Codec.FRAMES) == messages


# Section 7, line for line.
TEXT_LINES = [
    ({"type": "msg", "room": "lobby", "from": "bob", "text": "hi", "seq": 1, "ts": 2, "id": "c1"},
     "[lobby] bob: hi"),
    ({"type": "presence", "room": "lobby", "nick": "carol", "status": "join"}, "* carol joined lobby"),
    ({"type": "presence", "room": "lobby", "nick": "carol", "status": "leave"}, "* carol left lobby"),
    ({"type": "presence", "room": "lobby", "nick": "carol", "status": "offline"}, "* carol is offline"),
    ({"type": "dm", "from": "bob", "text": "psst", "ts": 2}, "[dm] bob: psst"),
    ({"type": "who", "room": "lobby", "members": ["alice", "bob"]}, "* members of lobby: alice bob"),
    ({"type": "rooms", "rooms": [{"room": "lobby", "members": 3, "seq": 9}, {"room": "dev", "members": 1, "seq": 0}]},
     "* rooms: lobby(3) dev(1)"),
    ({"type": "rooms", "rooms": []}, "* rooms: (none)"),
    ({"type": "error", "code": "rate_limited", "message": "human readable"}, "! rate_limited: human readable"),
    ({"type": "error", "code": "bad_request", "message": "unknown command /x"}, "! bad_request: unknown command /x"),
    ({"type": "shutdown", "reason": "drain", "reconnect_after": 5000}, "* server shutting down, reconnect in 5 s"),
    ({"type": "shutdown", "reason": "drain", "reconnect_after": 4200}, "* server shutting down, reconnect in 5 s"),
    ({"type": "welcome", "v": 1, "session": "s", "nick": "alice", "heartbeat": 30}, "* welcome alice"),
    ({"type": "joined", "room": "lobby", "seq": 0, "first_seq": 1, "members": ["alice", "bob"]},
     "* joined lobby, members: alice bob"),
    ({"type": "left", "room": "lobby"}, "* left lobby"),
]


@pytest.mark.parametrize("message, line", TEXT_LINES)
def test_render_text(message, line):
    assert render_text(message) == line
    assert encode_text(message) == (line + "\n").encode()


@pytest.mark.parametrize("message", [
    {"type": "ack", "id": "c1", "room": "lobby", "seq": 1, "ts": 2},
    {"type": "pong", "ts": 1},
    {"type": "ping", "ts": 1},
    {"type": "history", "room": "lobby", "messages": []},
])
def test_machine_chatter_renders_nothing(message):
    assert render_text(message) is None
    assert encode_text(message) == b""


def test_history_renders_one_line_per_message():
    messages = [{"type": "msg", "room": "dev", "from": "ann", "text": f"m{i}", "seq": i, "ts": 0} for i in (1, 2)]
    assert encode_text({"type": "history", "room": "dev", "messages": messages}) == b"[dev] ann: m1\n[dev] ann: m2\n"


@pytest.mark.parametrize("message", [
    {"type": "msg", "room": "lobby", "from": "bob", "text": "one\ntwo\r\nthree\rfour"},
    {"type": "dm", "from": "bob", "text": "\n\nsneaky\n* server shutting down"},
    {"type": "error", "code": "bad_request", "message": "multi\nline\r\n"},
])
def test_newlines_inside_text_never_break_a_text_line(message):
    data = encode_text(message)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert b"\r" not in data


@pytest.mark.parametrize("codec", list(Codec))
def test_outgoing_is_encoded_once_per_codec(codec):
    message = {"type": "msg", "room": "lobby", "from": "bob", "text": "hi", "seq": 1, "ts": 2}
    out = Outgoing(message)
    first = out.encoded(codec)
    assert out.encoded(codec) is first
    assert first == encode(message, codec)


def test_outgoing_codecs_differ():
    out = Outgoing({"type": "msg", "room": "lobby", "from": "bob", "text": "hi", "seq": 1, "ts": 2})
    assert out.encoded(Codec.TEXT) == b"[lobby] bob: hi\n"
    assert out.encoded(Codec.JSON).endswith(b"}\n")
    assert out.encoded(Codec.FRAMES)[8:] == out.encoded(Codec.JSON)[:-1]


# ---------------------------------------------------------------- text mode commands (section 7)


def test_first_line_is_the_nick():
    assert parse_text_line("alice", greeted=False) == {"type": "hello", "nick": "alice"}
    assert parse_text_line("  alice \r", greeted=False) == {"type": "hello", "nick": "alice"}
    assert parse_request(parse_text_line("alice", greeted=False), MAX_TEXT) == Hello(None, "alice", None, None)


def test_bad_nick_line_is_bad_nick():
    with pytest.raises(ProtocolError) as info:
        parse_request(parse_text_line("not a nick", greeted=False), MAX_TEXT)
    assert info.value.code == "bad_nick"


def test_token_line_with_jwt():
    assert parse_text_line("/token abc.def.ghi", greeted=False, jwt=True) == {"type": "hello", "token": "abc.def.ghi"}
    assert parse_text_line("/token   abc  ", greeted=False, jwt=True) == {"type": "hello", "token": "abc"}


def test_with_jwt_a_bare_nick_is_an_empty_token_not_a_login():
    request = parse_text_line("alice", greeted=False, jwt=True)
    assert request == {"type": "hello", "token": ""}
    assert parse_request(request, MAX_TEXT) == Hello(None, None, "", None)


@pytest.mark.parametrize("line, expected", [
    ("/join dev", {"type": "join", "room": "dev"}),
    ("/join   dev  ", {"type": "join", "room": "dev"}),
    ("/leave dev", {"type": "leave", "room": "dev"}),
    ("/who", {"type": "who", "room": None}),
    ("/who dev", {"type": "who", "room": "dev"}),
    ("/rooms", {"type": "rooms"}),
    ("/msg bob hello there", {"type": "dm", "to": "bob", "text": "hello there"}),
    ("/quit", {"type": "bye"}),
    ("hello world", {"type": "msg", "room": None, "text": "hello world"}),
    ("  padded  ", {"type": "msg", "room": None, "text": "padded"}),
])
def test_text_commands(line, expected):
    assert parse_text_line(line, greeted=True) == expected
    assert parse_text_line(line, greeted=True, jwt=True) == expected


@pytest.mark.parametrize("line, expected", [
    ("/join dev", Join(None, "dev", None)),
    ("/leave dev", Leave(None, "dev")),
    ("/who dev", Who(None, "dev")),
    ("/rooms", Rooms(None)),
    ("/msg bob hi", Dm(None, "bob", "hi")),
    ("/quit", Bye(None)),
])
def test_text_commands_are_valid_requests(line, expected):
    assert parse_request(parse_text_line(line, greeted=True), MAX_TEXT) == expected


def test_join_without_a_room_is_bad_room():
    with pytest.raises(ProtocolError) as info:
        parse_request(parse_text_line("/join", greeted=True), MAX_TEXT)
    assert info.value.code == "bad_room"


@pytest.mark.parametrize("command", ["/x", "/frobnicate", "/JOIN", "/"])
def test_unknown_command_is_bad_request_naming_it(command):
    with pytest.raises(ProtocolError) as info:
        parse_text_line(command + " some args", greeted=True)
    assert info.value.code == "bad_request"
    assert command in info.value.message
    assert render_text(info.value.to_message()) == f"! bad_request: unknown command {command}"


# ---------------------------------------------------------------- fuzzing

json_scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=6)

# Objects shaped like requests, so validation gets past the type check most of the time.
FIELDS = ("id", "v", "nick", "token", "resume", "room", "text", "to", "since", "limit", "ts")
odd_values = json_values | st.sampled_from(["\ud800", "lobby", "alice", "x" * 65, 2**64, -1, 0, 1.5,
                                            float("nan"), float("inf")])
request_like = st.builds(
    lambda kind, fields: {**fields, "type": kind},
    st.sampled_from(["hello", "join", "leave", "msg", "dm", "who", "rooms", "history", "ping", "pong",
                     "bye", "nope"]) | json_values,
    st.dictionaries(st.sampled_from(FIELDS), odd_values, max_size=5),
)


def decode_fuzz(data, cuts, max_frame_bytes=64):
    """Events for ``data`` cut at ``cuts``; anything but a ProtocolError escapes and fails the test."""
    return decode_chunks(split_at(data, cuts), max_frame_bytes)


@FUZZ
@given(prefix=st.sampled_from([b"", b"GCF1", b"{", b" \r\n{", b"GC", b"\n", b"\nGCF1", b" GC"]),
       body=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_fuzz_random_bytes_raise_only_protocol_errors_however_chunked(prefix, body, cuts):
    data = prefix + body
    events = decode_fuzz(data, cuts)
    assert events == decode_fuzz(data, []), "chunking changed the outcome"
    assert events == decode_chunks(byte_by_byte(data), 64)


@FUZZ
@given(messages=st.lists(json_objects, min_size=1, max_size=5), position=st.integers(0, 10**6),
       flip=st.integers(1, 255), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_fuzz_corrupted_frames(messages, position, flip, cuts):
    frames = [encode_frame(m) for m in messages]
    data = bytearray(b"".join(frames))
    position %= len(data)
    data[position] ^= flip
    events = decode_chunks(split_at(FRAME_MAGIC + bytes(data), cuts), 1 << 16)
    # which frame was hit, and was it in its payload (after the 8 header bytes)?
    start = 0
    for index, f in enumerate(frames):
        if position < start + len(f):
            break
        start += len(f)
    if position - start >= 8:  # CRC-32 catches every single-byte change; the others are untouched
        expected = list(messages)
        expected[index] = ("error", "bad_checksum")
        assert events == expected
    else:
        assert events[:index] == messages[:index]


@FUZZ
@given(garbage=st.binary(max_size=200), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_fuzz_json_stream_recovers_after_a_non_closing_error(garbage, cuts):
    data = b"{" + garbage + b'\n{"type":"sentinel"}\n'
    events = decode_chunks(split_at(data, cuts), 1 << 16)
    assert events[-1] == {"type": "sentinel"}


@FUZZ
@given(garbage=st.binary(max_size=200), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_fuzz_text_stream_recovers_after_a_non_closing_error(garbage, cuts):
    data = b"alice\n" + garbage + b"\nsentinel\n"
    events = decode_chunks(split_at(data, cuts), 1 << 16)
    assert events[0] == "alice"
    assert events[-1] == "sentinel"


@FUZZ
@given(messages=st.lists(json_objects, max_size=6), codec=st.sampled_from(["json", "frames"]),
       cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_fuzz_encoded_messages_round_trip_however_chunked(messages, codec, cuts):
    if codec == "json":
        data = b"".join(encode_json(m) for m in messages)
    else:
        data = FRAME_MAGIC + b"".join(encode_frame(m) for m in messages)
    assert decode_chunks(split_at(data, cuts), 1 << 16) == messages


@FUZZ
@given(obj=json_objects | request_like)
def test_fuzz_parse_request_raises_only_protocol_errors(obj):
    try:
        request = parse_request(obj, MAX_TEXT)
    except ProtocolError as exc:
        assert exc.code in ERRORS
        encode_json(exc.to_message())  # whatever is echoed can be written back
    else:
        assert isinstance(request, REQUEST_TYPES)
        encode_json(dataclasses.asdict(request))
