"""Unit tests for message_reader: heads and bodies read from buffered streams.

The reader is an ``io.BufferedReader`` over ``io.BytesIO`` (the
``readline``/``read``/``read1`` interface that ``socket_io.SocketReader``
offers in production; without ``read_head``, so heads are read line by
line); no sockets.  A tiny buffer size is used where it matters, so short reads
happen the way they do on a real socket.
"""

from __future__ import annotations

import io
import random
import sys
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from http11 import BodyFraming, ProtocolError  # noqa: E402
from message_reader import (BodyTooLarge, EmptyResponse, IncompleteHead, Limits, MalformedBody,  # noqa: E402
                            TruncatedBody, iter_body, read_field_lines, read_response_head,
                            read_small_body)


def stream(data: bytes, buffer_size: int = 8192) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data), buffer_size=buffer_size)


def collect(reader, framing, piece=65536, max_size=None):
    """All pieces, or the pieces before the exception plus the exception."""
    pieces = []
    try:
        for data in iter_body(reader, framing, piece, max_size):
            pieces.append(data)
    except Exception as error:  # noqa: BLE001 - returned for the test to inspect
        return pieces, error
    return pieces, None


def chunked(*chunks: bytes, trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailers + b"\r\n"


# --- header section ----------------------------------------------------------------

class ReadFieldLinesTest(unittest.TestCase):
    def test_reads_up_to_the_empty_line_and_leaves_the_rest(self):
        for for_response in (False, True):
            with self.subTest(for_response=for_response):
                reader = stream(b"Host: a\r\nX-B:  b \r\n\r\nBODY")
                self.assertEqual(read_field_lines(reader, Limits(), for_response),
                                 [("Host", "a"), ("X-B", "b")])
                self.assertEqual(reader.read(), b"BODY")

    def test_empty_header_section(self):
        self.assertEqual(read_field_lines(stream(b"\r\nrest"), Limits(), False), [])

    def assert_request_error(self, status, data, limits):
        with self.assertRaises(ProtocolError) as ctx:
            read_field_lines(stream(data), limits, for_response=False)
        self.assertEqual(ctx.exception.status, status, ctx.exception.message)

    def assert_response_error(self, data, limits):
        with self.assertRaises(ValueError):
            read_field_lines(stream(data), limits, for_response=True)

    def test_field_count_limit(self):
        limits = Limits(max_fields=3)
        at_limit = b"".join(b"X-%d: v\r\n" % i for i in range(3)) + b"\r\n"
        over = b"".join(b"X-%d: v\r\n" % i for i in range(4)) + b"\r\n"
        for for_response in (False, True):
            with self.subTest(for_response=for_response):
                self.assertEqual(len(read_field_lines(stream(at_limit), limits, for_response)), 3)
        self.assert_request_error(431, over, limits)
        self.assert_response_error(over, limits)

    def test_line_length_limit(self):
        limits = Limits(max_line=20)
        exact = b"X: " + b"v" * 15 + b"\r\n"  # 20 bytes with CRLF
        self.assertEqual(len(exact), 20)
        self.assertEqual(read_field_lines(stream(exact + b"\r\n"), limits, False), [("X", "v" * 15)])
        long_line = b"X: " + b"v" * 16 + b"\r\n"
        self.assert_request_error(431, long_line + b"\r\n", limits)
        self.assert_response_error(long_line + b"\r\n", limits)
        huge = b"X: " + b"v" * 100_000 + b"\r\n\r\n"
        self.assert_request_error(431, huge, limits)

    def test_total_size_limit(self):
        # 5 lines of 11 bytes + the final CRLF = 57 bytes
        head = b"".join(b"X-%d: abcd\r\n" % i for i in range(5)) + b"\r\n"
        self.assertEqual(len(head), 57)
        self.assertEqual(len(read_field_lines(stream(head), Limits(max_header_bytes=57), False)), 5)
        self.assert_request_error(431, head, Limits(max_header_bytes=56))
        self.assert_response_error(head, Limits(max_header_bytes=56))

    def test_request_errors_are_400(self):
        cases = {
            "obs-fold": b"X-A: one\r\n two\r\n\r\n",
            "obs-fold first": b" X-A: one\r\n\r\n",
            "space before colon": b"X-A : one\r\n\r\n",
            "bare LF field": b"X-A: one\n\r\n",
            "bare LF end of head": b"X-A: one\r\n\n",
            "NUL in value": b"X-A: o\x00ne\r\n\r\n",
            "CR in value": b"X-A: o\rne\r\n\r\n",
            "EOF inside head": b"X-A: one\r\n",
            "EOF inside line": b"X-A: on",
            "EOF at start": b"",
        }
        for why, data in cases.items():
            with self.subTest(why=why):
                self.assert_request_error(400, data, Limits())

    def test_response_obs_fold_is_unfolded(self):
        reader = stream(b"X-A: one\r\n two\r\n\t three \r\nY: z\r\n\r\nbody")
        self.assertEqual(read_field_lines(reader, Limits(), for_response=True),
                         [("X-A", "one two three"), ("Y", "z")])
        self.assertEqual(reader.read(), b"body")

    def test_response_errors_are_value_errors(self):
        cases = {
            "fold with no previous field": b" X-A: one\r\n\r\n",
            "space before colon": b"X-A : one\r\n\r\n",
            "CR in value": b"X-A: o\rne\r\n\r\n",
            "NUL in value": b"X-A: o\x00ne\r\n\r\n",
            "NUL in folded value": b"X-A: one\r\n t\x00wo\r\n\r\n",
            "CR in folded value": b"X-A: one\r\n t\rwo\r\n\r\n",
            "bad name": b"X(A): one\r\n\r\n",
        }
        for why, data in cases.items():
            with self.subTest(why=why):
                self.assert_response_error(data, Limits())

    def test_response_cut_by_eof_is_a_transport_failure(self):
        # A backend that dies mid-head failed at the transport level (the
        # request may be retried), unlike one that sent a malformed head.
        for why, data in {"EOF inside head": b"X-A: one\r\n", "EOF at start": b"",
                          "EOF inside line": b"X-A: on"}.items():
            with self.subTest(why=why):
                with self.assertRaises(IncompleteHead):
                    read_field_lines(stream(data), Limits(), for_response=True)


# --- response head ----------------------------------------------------------------

class ReadResponseHeadTest(unittest.TestCase):
    def head(self, data: bytes, method: str = "GET"):
        return read_response_head(stream(data), method, Limits())

    def test_simple_response(self):
        reader = stream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhiNEXT")
        head = read_response_head(reader, "GET", Limits())
        self.assertEqual((head.version, head.status, head.reason), ((1, 1), 200, "OK"))
        self.assertEqual(head.headers, [("Content-Length", "2"), ("X-A", "b")])
        self.assertEqual((head.framing.kind, head.framing.length), ("length", 2))
        self.assertTrue(head.reusable)
        self.assertEqual(head.interim, [])
        self.assertEqual(reader.read(), b"hiNEXT")

    def test_interim_responses_are_skipped(self):
        reader = stream(b"HTTP/1.1 100 Continue\r\n\r\n"
                        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                        b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc")
        head = read_response_head(reader, "POST", Limits())
        self.assertEqual(head.status, 201)
        self.assertEqual(head.interim, [100, 103])
        self.assertEqual(head.headers, [("Content-Length", "3")])
        self.assertEqual(reader.read(), b"abc")

    def test_switching_protocols_is_refused(self):
        with self.assertRaises(ValueError):
            self.head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\n\r\n")

    def test_empty_and_interrupted_responses(self):
        with self.assertRaises(EmptyResponse):
            self.head(b"")
        self.assertTrue(issubclass(EmptyResponse, ConnectionError))
        with self.assertRaises(ValueError):
            self.head(b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_invalid_heads(self):
        cases = {
            "bad status line": b"HTTP/1.1 2x0 OK\r\n\r\n",
            "HTTP/2 status line": b"HTTP/2.0 200 OK\r\n\r\n",
            "garbage": b"hello world\r\n\r\n",
            "bare LF status line": b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
            "two different CLs": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "TE not chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "CR in a value": b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
        }
        for why, data in cases.items():
            with self.subTest(why=why):
                with self.assertRaises(ValueError):
                    self.head(data)

    def test_truncated_head_is_incomplete_not_invalid(self):
        for data in (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", b"HTTP/1.1 200 O"):
            with self.subTest(data=data):
                with self.assertRaises(IncompleteHead):
                    self.head(data)

    def test_reusable_flag(self):
        cases = [
            ("1.1 with length", "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "length", True),
            ("1.1 chunked", "GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked", True),
            ("Connection: close", "GET",
             b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", "length", False),
            ("Connection: Keep-Alive, Close", "GET",
             b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 2\r\n\r\n",
             "length", False),
            ("CL and TE", "GET",
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
             "chunked", False),
            ("204 with a body length", "GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
             "none", False),
            ("204 with chunked", "GET",
             b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", "none", False),
            ("204 with CL 0", "GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", "none", True),
            ("204 plain", "GET", b"HTTP/1.1 204 No Content\r\n\r\n", "none", True),
            # RFC 9110 8.6: a 304's / HEAD's Content-Length describes the selected representation
            # A bodiless answer that declares a body is not reused: a buggy backend
            # that sends the body anyway (even later) would poison the next request.
            ("304 with CL", "GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n", "none", False),
            ("HEAD with CL", "HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", "none", False),
            ("HEAD with CL 0", "HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "none", True),
            ("HTTP/1.0 without keep-alive", "GET",
             b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", "length", False),
            ("HTTP/1.0 with keep-alive", "GET",
             b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n", "length", True),
            ("ends at close", "GET", b"HTTP/1.1 200 OK\r\n\r\n", "close", False),
            ("ends at close despite keep-alive", "GET",
             b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n", "close", False),
        ]
        for why, method, data, kind, reusable in cases:
            with self.subTest(why=why):
                head = self.head(data, method)
                self.assertEqual(head.framing.kind, kind)
                self.assertEqual(head.reusable, reusable)

    def test_transfer_encoding_in_http10_response_is_never_reused(self):
        # RFC 9112 6.1: "A server or client that receives an HTTP/1.0 message
        # containing a Transfer-Encoding header field MUST treat the message as
        # if the framing is faulty, even if a Content-Length is present, and
        # close the connection after processing the message."
        cases = [
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 5\r\n\r\n",
        ]
        for data in cases:
            with self.subTest(data=data):
                try:
                    head = self.head(data)
                except ValueError:
                    continue  # refusing the response outright is acceptable too
                self.assertFalse(head.reusable)


# --- bodies -----------------------------------------------------------------------

class IterBodyLengthTest(unittest.TestCase):
    def test_exact_length_leaves_the_next_message(self):
        reader = stream(b"hello worldNEXT")
        pieces, error = collect(reader, BodyFraming("length", 11), piece=4)
        self.assertIsNone(error)
        self.assertEqual(b"".join(pieces), b"hello world")
        self.assertTrue(all(1 <= len(p) <= 4 for p in pieces), pieces)
        self.assertEqual(reader.read(), b"NEXT")

    def test_truncated(self):
        pieces, error = collect(stream(b"hello"), BodyFraming("length", 11))
        self.assertIsInstance(error, TruncatedBody)
        self.assertEqual(b"".join(pieces), b"hello")

    def test_no_body_reads_nothing(self):
        reader = stream(b"NEXT")
        self.assertEqual(collect(reader, BodyFraming("none")), ([], None))
        self.assertEqual(collect(reader, BodyFraming("length", 0)), ([], None))
        self.assertEqual(reader.read(), b"NEXT")

    def test_close_delimited_reads_to_eof(self):
        data = bytes(range(256)) * 40
        pieces, error = collect(stream(data, buffer_size=100), BodyFraming("close"), piece=33)
        self.assertIsNone(error)
        self.assertEqual(b"".join(pieces), data)
        self.assertTrue(all(1 <= len(p) <= 33 for p in pieces))
        self.assertEqual(collect(stream(b""), BodyFraming("close")), ([], None))


class IterBodyChunkedTest(unittest.TestCase):
    def test_extensions_and_trailers(self):
        data = (b"5;ext=1\r\nhello\r\n"
                b'6;a=b;c="d;e"\r\n world\r\n'
                b"A\r\n0123456789\r\n"
                b"0;last\r\nTrailer-A: x\r\nTrailer-B: y\r\n\r\n"
                b"NEXT")
        reader = stream(data)
        pieces, error = collect(reader, BodyFraming("chunked"))
        self.assertIsNone(error)
        self.assertEqual(b"".join(pieces), b"hello world0123456789")
        self.assertEqual(reader.read(), b"NEXT", "trailers consumed, next message intact")

    def test_without_trailers_and_empty_body(self):
        reader = stream(chunked(b"abc") + b"NEXT")
        self.assertEqual(b"".join(collect(reader, BodyFraming("chunked"))[0]), b"abc")
        self.assertEqual(reader.read(), b"NEXT")
        reader = stream(b"0\r\n\r\nNEXT")
        self.assertEqual(collect(reader, BodyFraming("chunked")), ([], None))
        self.assertEqual(reader.read(), b"NEXT")

    def test_chunk_size_mismatch_is_malformed(self):
        cases = {
            "chunk larger than declared": b"3\r\nhello\r\n0\r\n\r\n",
            "chunk smaller than declared": b"5\r\nhey\r\n0\r\n\r\n",
            "junk instead of CRLF": b"5\r\nhelloXX0\r\n\r\n",
            "bare LF after data": b"5\r\nhello\n0\r\n\r\n",
            "bare CR after data": b"5\r\nhello\r0\r\n\r\n",
        }
        for why, data in cases.items():
            with self.subTest(why=why):
                _, error = collect(stream(data), BodyFraming("chunked"))
                self.assertIsInstance(error, MalformedBody)
                self.assertNotIsInstance(error, BodyTooLarge)

    def test_bad_chunk_size_is_malformed(self):
        cases = [b"0x5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"+5\r\nhello\r\n0\r\n\r\n",
                 b" 5\r\nhello\r\n0\r\n\r\n", b"5\nhello\r\n0\r\n\r\n", b"\r\n",
                 b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", b"-1\r\n",
                 b"5;" + b"x" * 2000 + b"\r\nhello\r\n0\r\n\r\n"]  # size line longer than allowed
        for data in cases:
            with self.subTest(data=data[:40]):
                pieces, error = collect(stream(data), BodyFraming("chunked"))
                self.assertIsInstance(error, MalformedBody)
                self.assertEqual(pieces, [])

    def test_bad_trailer_section_is_malformed(self):
        # RFC 9112 7.1.2: trailer lines get the header field line rules; anything
        # else in the trailer section is MalformedBody (a 400 for a request, a
        # 502 for a response), never skipped as if it were a field.
        cases = {
            "bare CR then a request line": b"0\r\n\rGET /hidden HTTP/1.1\r\n\r\n",
            "a request line": b"0\r\nGET /hidden HTTP/1.1\r\nHost: a\r\n\r\n",
            "digits glued to a method": b"0\r\n12345POST /echo HTTP/1.1\r\n\r\n",
            "NUL in value": b"0\r\nX-Checksum: a\x00c\r\n\r\n",
            "NUL line": b"0\r\n\x00\r\n\r\n",
            "bare CR in value": b"0\r\nX-Checksum: a\rc\r\n\r\n",
            "control character": b"0\r\nX-Checksum: a\x01c\r\n\r\n",
            "DEL": b"0\r\nX-Checksum: a\x7f\r\n\r\n",
            "bare LF trailer": b"0\r\nX: y\n\r\n",
            "bare LF ends the section": b"0\r\nX: y\r\n\n",
            "bare LF only": b"0\r\n\nNEXT\r\n\r\n",
            "bare CR then CRLF": b"0\r\n\r\r\n\r\n",
            "no colon": b"0\r\nX-Checksum abc\r\n\r\n",
            "space before colon": b"0\r\nX-Checksum : abc\r\n\r\n",
            "tab before colon": b"0\r\nX-Checksum\t: abc\r\n\r\n",
            "obs-fold": b"0\r\nX-Checksum: abc\r\n def\r\n\r\n",
            "obs-fold first": b"0\r\n def\r\n\r\n",
            "empty name": b"0\r\n: abc\r\n\r\n",
            "bad name character": b"0\r\nX(Checksum): abc\r\n\r\n",
            "bad line after a good one": b"0\r\nX-A: 1\r\n\rGET / HTTP/1.1\r\n\r\n",
            "line too long": b"0\r\nX: " + b"v" * 9000 + b"\r\n\r\n",
            "too many trailers": b"0\r\n" + b"X: y\r\n" * 200 + b"\r\n",
        }
        for why, data in cases.items():
            for buffer_size in (3, 8192):  # short reads split lines anywhere
                with self.subTest(why=why, buffer_size=buffer_size):
                    _, error = collect(stream(b"3\r\nabc\r\n" + data, buffer_size),
                                       BodyFraming("chunked"))
                    self.assertIsInstance(error, MalformedBody, f"got {error!r}")
                    self.assertNotIsInstance(error, BodyTooLarge)

    def test_good_trailer_sections_are_dropped(self):
        cases = {
            "none": b"",
            "one checksum": b"X-Checksum: abc\r\n",
            "no space": b"X-Checksum:abc\r\n",
            "empty value": b"X-Empty:\r\n",
            "OWS around the value": b"X-A: \t v \t\r\n",
            "obs-text": b"X-A: caf\xe9\r\n",
            "several": b"X-A: 1\r\nX-B: 2\r\nServer-Timing: db;dur=53\r\n",
            "at the field limit": b"X: y\r\n" * 99,
            "at the line limit": b"X: " + b"v" * 8187 + b"\r\n",
        }
        for why, trailers in cases.items():
            for buffer_size in (3, 8192):
                with self.subTest(why=why, buffer_size=buffer_size):
                    reader = stream(chunked(b"abc", trailers=trailers) + b"NEXT", buffer_size)
                    pieces, error = collect(reader, BodyFraming("chunked"))
                    self.assertIsNone(error)
                    self.assertEqual(b"".join(pieces), b"abc")
                    self.assertEqual(reader.read(), b"NEXT", "trailers consumed, next message intact")

    def test_truncated_inside_size_or_data(self):
        cases = {
            "no bytes at all": b"",
            "inside the data": b"5\r\nhel",
            "before the next size line": b"5\r\nhello\r\n",
        }
        for why, data in cases.items():
            with self.subTest(why=why):
                _, error = collect(stream(data), BodyFraming("chunked"))
                self.assertIsInstance(error, TruncatedBody)

    def test_stream_ending_early_is_truncated_not_malformed(self):
        # The module's contract: TruncatedBody "when the stream ends early",
        # MalformedBody for bad chunk syntax.  A stream that simply stops
        # before the CRLF after the data, or inside the trailer section, has no
        # bad syntax in it: it ended early.
        cases = {
            "before the CRLF after the data": b"5\r\nhello",
            "between CR and LF after the data": b"5\r\nhello\r",
            "after the last chunk": b"5\r\nhello\r\n0\r\n",
            "inside the trailer section": b"0\r\nTrailer-A: x\r\n",
            "inside a trailer line": b"0\r\nTrailer-A: x",
        }
        for why, data in cases.items():
            with self.subTest(why=why):
                _, error = collect(stream(data), BodyFraming("chunked"))
                self.assertIsInstance(error, TruncatedBody, f"got {error!r}")

    def test_max_size(self):
        data = chunked(b"hello", b" world")  # 11 bytes
        self.assertEqual(b"".join(collect(stream(data), BodyFraming("chunked"), max_size=11)[0]),
                         b"hello world")
        pieces, error = collect(stream(data), BodyFraming("chunked"), max_size=10)
        self.assertIsInstance(error, BodyTooLarge)
        self.assertIsInstance(error, MalformedBody)
        # refused on the size line: no byte of the oversized chunk is yielded
        self.assertEqual(pieces, [b"hello"])

    def test_max_size_refuses_a_huge_declared_chunk_without_reading_it(self):
        pieces, error = collect(stream(b"fffffffffff\r\nabc"), BodyFraming("chunked"), max_size=1024)
        self.assertIsInstance(error, BodyTooLarge)
        self.assertEqual(pieces, [])


class PieceSizeTest(unittest.TestCase):
    def test_pieces_never_exceed_the_piece_size(self):
        rng = random.Random(7)
        payload = bytes(rng.randrange(256) for _ in range(5000))
        sizes = [1, 7, 100, 999, 3000]
        chunks, offset = [], 0
        for size in sizes * 2:
            if offset >= len(payload):
                break
            chunks.append(payload[offset:offset + size])
            offset += size
        body = b"".join(chunks)
        cases = [
            ("length", BodyFraming("length", len(payload)), payload, payload),
            ("close", BodyFraming("close"), payload, payload),
            ("chunked", BodyFraming("chunked"), chunked(*chunks), body),
        ]
        for kind, framing, data, expected in cases:
            for piece in (1, 3, 64, 1000, 65536):
                for buffer_size in (16, 8192):
                    with self.subTest(kind=kind, piece=piece, buffer_size=buffer_size):
                        pieces, error = collect(stream(data, buffer_size), framing, piece=piece)
                        self.assertIsNone(error)
                        self.assertEqual(b"".join(pieces), expected)
                        self.assertTrue(all(1 <= len(p) <= piece for p in pieces),
                                        max(map(len, pieces)))


class ReadSmallBodyTest(unittest.TestCase):
    def test_exact_and_truncated(self):
        reader = stream(b"abcdefNEXT", buffer_size=2)
        self.assertEqual(read_small_body(reader, 6), b"abcdef")
        self.assertEqual(reader.read(), b"NEXT")
        self.assertEqual(read_small_body(stream(b""), 0), b"")
        with self.assertRaises(TruncatedBody):
            read_small_body(stream(b"abc"), 6)


if __name__ == "__main__":
    unittest.main()
