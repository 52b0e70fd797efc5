"""Hardening tests (issue 3): strict framing, smuggling defence, limits, timeouts, streaming.

Every test talks to a real ``cclb.py`` child process over raw sockets and
checks both sides: what the client receives, and what a scripted
``RawBackend`` received (the exact bytes).  Backends answer through
``Script``: an echo by default, scripted raw bytes for ``/resp/<name>``.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import unittest
import zlib
from typing import Iterator

from tests.support import (BASE_ARGS, Balancer, BalancerCase, Client, RawBackend, Route, Script, Seen,
                           backend_mark, collect_until_close, connect, echo_of, free_port, get,
                           http_exchange, parse_responses, post, process_fds, process_peak_rss_kib,
                           process_rss_kib, process_threads, raw_answer, read_response,
                           received_since, send_and_collect, wait_for)

MiB = 1024 * 1024

_SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"

# Scripted backend answers: name -> (raw bytes, keep the backend connection open).
RAW_RESPONSES: dict[str, tuple[bytes, bool]] = {
    "two-cl": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", True),
    "cl-list": (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!", True),
    "te-gzip": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello", True),
    "te-chunked-gzip": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
                        b"5\r\nhello\r\n0\r\n\r\n", True),
    "te-identity": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\n"
                    b"hello", True),
    "status-4digit": (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", True),
    "status-letters": (b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok", True),
    "status-http2": (b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    "status-garbage": (b"HELLO WORLD\r\nContent-Length: 2\r\n\r\nok", True),
    "status-version": (b"HTTP/1.1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    "cl-te": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled", True),
    "obs-fold": (b"HTTP/1.1 200 OK\r\nX-Folded: first\r\n  second\r\nContent-Length: 2\r\n\r\nok",
                 True),
    "cr-in-value": (b"HTTP/1.1 200 OK\r\nX-Bad: a\rb\r\nContent-Length: 2\r\n\r\nok", True),
    "lf-in-value": (b"HTTP/1.1 200 OK\r\nX-Bad: a\nX-Injected: b\r\nContent-Length: 2\r\n\r\nok", True),
    "nul-in-value": (b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nok", True),
    "head-body": (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
                  True),
    "head-smuggle": (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(_SMUGGLED), _SMUGGLED),
                     True),
    "304-smuggle": (b"HTTP/1.1 304 Not Modified\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(_SMUGGLED), _SMUGGLED), True),
    "204-body": (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", True),
    "304-body": (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 5\r\n\r\nhello", True),
    "304-chunked": (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n", True),
    "interim": (b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal", True),
    "truncated-small": (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        b"Content-Length: 100\r\n\r\n" + b"x" * 10, False),
    "truncated-large": (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        b"Content-Length: 1000000\r\n\r\n" + b"x" * 1000, False),
    "truncated-chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n", False),
    "close-delimited": (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n"
                        b"hello, close-delimited world", False),
}


# --- large bodies generated on the fly ----------------------------------------

DOWNLOAD_SIZE = 200 * MiB
UPLOAD_SIZE = 200 * MiB
GZIP_SIZE = 20 * MiB
_BLOCK = os.urandom(256 * 1024)
_TEXT_BLOCK = b"".join(b"line %06d: the quick brown fox jumps over the lazy dog\n" % i
                       for i in range(4400))[:256 * 1024]


def pattern(size: int, block: bytes) -> Iterator[memoryview]:
    view = memoryview(block)
    remaining = size
    while remaining:
        piece = view[:min(remaining, len(block))]
        remaining -= len(piece)
        yield piece


def pattern_crc(size: int, block: bytes) -> int:
    crc = 0
    for piece in pattern(size, block):
        crc = zlib.crc32(piece, crc)
    return crc


def stream_download(conn: socket.socket, seen: Seen) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: %d\r\n\r\n" % DOWNLOAD_SIZE)
    for piece in pattern(DOWNLOAD_SIZE, _BLOCK):
        conn.sendall(piece)
    return True


def stream_gzip_chunked(conn: socket.socket, seen: Seen) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for piece in pattern(GZIP_SIZE, _TEXT_BLOCK):
        conn.sendall(b"%x\r\n" % len(piece))
        conn.sendall(piece)
        conn.sendall(b"\r\n")
    conn.sendall(b"0\r\n\r\n")
    return True


def stream_gzip(conn: socket.socket, seen: Seen) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Length: %d\r\n\r\n" % GZIP_SIZE)
    for piece in pattern(GZIP_SIZE, _TEXT_BLOCK):
        conn.sendall(piece)
    return True


# Every scripted backend of this file: /resp/<name> answers RAW_RESPONSES[name],
# /stream/... generate large bodies on the fly.
SCRIPTED_ROUTES: dict[str, Route] = {
    **{f"/resp/{name}": raw_answer(raw, keep) for name, (raw, keep) in RAW_RESPONSES.items()},
    "/stream/download": stream_download,
    "/stream/gzip": stream_gzip,
    "/stream/gzip-chunked": stream_gzip_chunked,
}


class ScriptedCase(BalancerCase):
    """``BalancerCase`` whose backend knows the routes of ``SCRIPTED_ROUTES``."""

    routes = SCRIPTED_ROUTES


# --- requests from clients -------------------------------------------------------

SMUGGLE_CL_TE = (b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n")
SMUGGLE_TE_CL = (b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Length: 4\r\n\r\n5c\r\nGET /admin HTTP/1.1\r\nHost: a\r\n"
                 b"Content-Length: 15\r\n\r\nx=1\r\n0\r\n\r\n")

BAD_CONTENT_LENGTHS = {
    "two different": ["Content-Length: 5", "Content-Length: 6"],
    "two different in one field": ["Content-Length: 5, 6"],
    "+5": ["Content-Length: +5"],
    "0x10": ["Content-Length: 0x10"],
    "empty": ["Content-Length: "],
    "1,2": ["Content-Length: 1,2"],
    "-1": ["Content-Length: -1"],
    "space inside": ["Content-Length: 1 2"],
    "letters": ["Content-Length: five"],
    "huge": ["Content-Length: 99999999999999999999999"],
}

BAD_TRANSFER_ENCODINGS = {
    "gzip": ["Transfer-Encoding: gzip"],
    "chunked, gzip": ["Transfer-Encoding: chunked, gzip"],
    "chunked, chunked": ["Transfer-Encoding: chunked, chunked"],
    "two chunked fields": ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
    "unknown": ["Transfer-Encoding: foo"],
    "unknown, chunked": ["Transfer-Encoding: foo, chunked"],
    "identity": ["Transfer-Encoding: identity"],
    "xchunked": ["Transfer-Encoding: xchunked"],
    "empty": ["Transfer-Encoding: "],
}

BAD_CHUNKED_BODIES = {
    "non-hex size": b"zz\r\nhello\r\n0\r\n\r\n",
    "0x prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "signed size": b"+5\r\nhello\r\n0\r\n\r\n",
    "underscore": b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    "empty size line": b"\r\nhello\r\n0\r\n\r\n",
    "missing CRLF after data": b"5\r\nhello0\r\n\r\n",
    "bare LF after size": b"5\nhello\r\n0\r\n\r\n",
    "bare LF after data": b"5\r\nhello\n0\r\n\r\n",
    "chunk larger than declared": b"3\r\nhello\r\n0\r\n\r\n",
    "size overflow": b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
}

BAD_FIELDS = {
    "space before colon": ["X-A : b"],
    "tab before colon": ["X-A\t: b"],
    "obs-fold": ["X-A: b", " c"],
    "obs-fold with tab": ["X-A: b", "\tc"],
    "NUL in value": ["X-A: b\x00c"],
    "CR in value": ["X-A: b\rc"],
    "LF in value": ["X-A: b\nX-C: d"],
    "space in name": ["X A: b"],
    "@ in name": ["X@A: b"],
    "empty name": [": b"],
    "no colon": ["X-A b"],
    "DEL in name": ["X\x7fA: b"],
    "non-ASCII name": ["X\xe9: b"],
}

BAD_REQUEST_LINES: dict[str, tuple[bytes, tuple[int, ...]]] = {
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", (400,)),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", (505,)),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", (505,)),
    "HTTP/3.0": (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", (505,)),
    "h2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400, 505)),
    "HTTP/0.9": (b"GET /\r\n\r\n", (400,)),
    "lower-case version": (b"GET / http/1.1\r\nHost: a\r\n\r\n", (400,)),
    "version with two digits": (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", (400,)),
    "double space": (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", (400,)),
    "tab separator": (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", (400,)),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", (400,)),
    "words": (b"HELLO WORLD\r\n\r\n", (400,)),
    "bad method": (b"G(E)T / HTTP/1.1\r\nHost: a\r\n\r\n", (400,)),
    "NUL in target": (b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n", (400,)),
    "bare LF request line": (b"GET / HTTP/1.1\nHost: a\r\n\r\n", (400,)),
}

BAD_HOSTS = {
    "HTTP/1.1 without Host": b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
    "two Hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two identical Hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    "two Hosts in HTTP/1.0": b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    "malformed Host": b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "Host with userinfo": b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
}


def request_with(fields: list[str], body: bytes = b"", line: str = "POST /bad HTTP/1.1") -> bytes:
    return "\r\n".join([line, "Host: test.invalid", *fields, "", ""]).encode("latin-1") + body


def chunked_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test.invalid\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode() + body


class RequestFramingTest(ScriptedCase):
    """Requests from clients: RFC 9112 framing, smuggling, field syntax, Expect, pipelining."""

    def test_cl_and_te_is_rejected_and_leftover_never_becomes_a_request(self) -> None:
        for name, payload in (("CL.TE", SMUGGLE_CL_TE), ("TE.CL", SMUGGLE_TE_CL)):
            with self.subTest(name):
                self.assert_rejected(payload, (400,), name)
                self.assertNotIn(b"/admin", self.backend.received())
                self.assertNotIn(b"/smuggle", self.backend.received())

    def test_cl_and_te_rejected_even_when_client_keeps_sending(self) -> None:
        # The client keeps the connection open and sends the smuggled request
        # again after the 400: the connection must already be closed.
        client = Client(self, self.port)
        client.send(SMUGGLE_CL_TE)
        response = client.response()
        self.assertEqual(response.status, 400)
        try:
            client.send(get("/admin"))
        except OSError:
            pass
        rest, closed = client.closed()
        self.assertEqual(rest, b"")
        self.assertTrue(closed)
        self.assert_backend_untouched(backend_mark(self.backend))
        self.assertNotIn(b"/admin", self.backend.received())

    def test_bad_content_length_is_400_and_close(self) -> None:
        for name, fields in BAD_CONTENT_LENGTHS.items():
            with self.subTest(name):
                self.assert_rejected(request_with(fields, b"hello!"), (400,), name)

    def test_identical_content_lengths_are_merged(self) -> None:
        for name, fields in (("repeated field", ["Content-Length: 5", "Content-Length: 5"]),
                             ("list", ["Content-Length: 5, 5"])):
            with self.subTest(name):
                path = f"/merge/{name.replace(' ', '-')}"
                client = Client(self, self.port)
                client.send(request_with(fields, b"hello", f"POST {path} HTTP/1.1"))
                echo = self.assert_echo(client.response(), path, "POST")
                self.assertEqual((echo["length"], echo["body"]), (5, "hello"))
                head = self.script.seen(path).head.lower()
                self.assertEqual(head.count(b"content-length:"), 1, head)
                self.assertIn(b"content-length: 5\r\n", head)
                self.assertNotIn(b"transfer-encoding", head)
                # and the connection is still usable
                self.assert_echo(client.request(get("/merge/after")), "/merge/after")

    def test_bad_transfer_encoding_is_rejected_and_closed(self) -> None:
        body = b"5\r\nhello\r\n0\r\n\r\n"
        for name, fields in BAD_TRANSFER_ENCODINGS.items():
            with self.subTest(name):
                self.assert_rejected(request_with(fields, body), (400, 501), name)
        with self.subTest("chunked in HTTP/1.0"):
            self.assert_rejected(request_with(["Transfer-Encoding: chunked"], body,
                                              "POST /bad HTTP/1.0"), (400, 501), "HTTP/1.0")

    def test_valid_chunked_request_is_forwarded(self) -> None:
        path = "/chunked/ok"
        client = Client(self, self.port)
        client.send(chunked_request(path, b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"))
        echo = self.assert_echo(client.response(), path, "POST")
        self.assertEqual(echo["body"], "hello world")
        head = self.script.seen(path).head.lower()
        self.assertIn(b"transfer-encoding: chunked\r\n", head)
        self.assertNotIn(b"content-length", head)
        self.assert_echo(client.request(get("/chunked/after")), "/chunked/after")

    def test_bad_chunk_syntax_is_400_and_backend_never_gets_a_complete_request(self) -> None:
        for index, (name, body) in enumerate(BAD_CHUNKED_BODIES.items()):
            with self.subTest(name):
                path = f"/bad-chunk/{index}"
                raw, closed = send_and_collect(self.port, chunked_request(path, body))
                responses = parse_responses(raw)
                self.assertEqual(len(responses), 1, f"{name}: {raw!r}")
                self.assertIn(responses[0].status, (400, 413) if "overflow" in name else (400,),
                              f"{name}: {raw!r}")
                self.assertTrue(closed, f"{name}: connection left open after {raw!r}")
                self.assert_never_complete(path, name)

    def test_bad_field_syntax_is_400(self) -> None:
        for name, fields in BAD_FIELDS.items():
            with self.subTest(name):
                self.assert_rejected(request_with(fields, line="GET /bad HTTP/1.1"), (400,), name)

    def test_host_rules(self) -> None:
        for name, payload in BAD_HOSTS.items():
            with self.subTest(name):
                self.assert_rejected(payload, (400,), name)
        with self.subTest("HTTP/1.0 without Host is fine"):
            client = Client(self, self.port)
            self.assert_echo(client.request(b"GET /host/10 HTTP/1.0\r\n\r\n"), "/host/10")

    def test_bad_request_lines(self) -> None:
        for name, (payload, statuses) in BAD_REQUEST_LINES.items():
            with self.subTest(name):
                self.assert_rejected(payload, statuses, name)

    def test_expect_100_continue_once_then_body_forwarded(self) -> None:
        for name, framing, body in (("content-length", "Content-Length: 5", b"hello"),
                                    ("chunked", "Transfer-Encoding: chunked",
                                     b"5\r\nhello\r\n0\r\n\r\n")):
            with self.subTest(name):
                path = f"/expect/{name}"
                client = Client(self, self.port)
                client.send(get(path, framing, "Expect: 100-continue", method="POST"))
                client.sock.settimeout(5)
                self.assertEqual(client.reader.readline(), b"HTTP/1.1 100 Continue\r\n")
                self.assertEqual(client.reader.readline(), b"\r\n")
                client.send(body)
                response = client.response()
                self.assertEqual(response.status, 200, "a second 100 Continue or an error")
                echo = self.assert_echo(response, path, "POST")
                self.assertEqual(echo["body"], "hello")
                head = self.script.seen(path).head.lower()
                self.assertNotIn(b"expect:", head)
                # Nothing more (no late 100), and the connection stays usable.
                self.assert_echo(client.request(get(f"{path}/after")), f"{path}/after")

    def test_pipelined_requests_answered_in_order(self) -> None:
        client = Client(self, self.port)
        client.send(get("/pipe/1") + post("/pipe/2", b"abc") + get("/pipe/3"))
        echoes = [echo_of(client.response()) for _ in range(3)]
        self.assertEqual([(e["path"], e["body"]) for e in echoes],
                         [("/pipe/1", ""), ("/pipe/2", "abc"), ("/pipe/3", "")])
        with self.script.lock:
            order = [s.path for s in self.script.served if s.path.startswith("/pipe/")]
        self.assertEqual(order, ["/pipe/1", "/pipe/2", "/pipe/3"])

    def test_pipeline_stops_at_a_bad_request(self) -> None:
        raw, closed = send_and_collect(
            self.port, get("/pipebad/1") + request_with(["X-A : b"], line="GET /pipebad/2 HTTP/1.1")
            + get("/pipebad/3"))
        responses = parse_responses(raw)
        self.assertEqual([r.status for r in responses], [200, 400], raw)
        self.assert_echo(responses[0], "/pipebad/1")
        self.assertTrue(closed)
        self.assert_backend_sync()
        self.assertNotIn(b"/pipebad/2", self.backend.received())
        self.assertNotIn(b"/pipebad/3", self.backend.received())

    def test_bytes_after_connection_close_are_ignored(self) -> None:
        mark = backend_mark(self.backend)
        raw, closed = send_and_collect(
            self.port, get("/close/1", "Connection: close") + get("/close/2") + b"garbage\r\n\r\n")
        responses = parse_responses(raw)
        self.assertEqual(len(responses), 1, raw)
        self.assert_echo(responses[0], "/close/1")
        self.assertTrue(closed)
        self.assert_backend_sync()
        self.assertNotIn(b"/close/2", received_since(self.backend, mark))


class ExpectWithoutBackendTest(ScriptedCase):
    """Expect: 100-continue when no backend can take the request: a 503 and no 100."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.script = Script(SCRIPTED_ROUTES)
        cls.backend = RawBackend(cls.script)  # unused: only for the shared assertions
        cls.addClassCleanup(cls.backend.stop)
        cls.balancer = Balancer([free_port()], *BASE_ARGS)  # nothing listens there
        cls.addClassCleanup(cls.balancer.stop)
        cls.port = cls.balancer.port

    def test_no_100_continue_without_backend(self) -> None:
        for name, framing in (("content-length", "Content-Length: 5"),
                              ("chunked", "Transfer-Encoding: chunked")):
            with self.subTest(name):
                raw, closed = send_and_collect(
                    self.port, get("/expect", framing, "Expect: 100-continue", method="POST"))
                self.assertNotIn(b"100 Continue", raw)
                responses = parse_responses(raw)
                self.assertEqual([r.status for r in responses], [503], raw)
                # The body was never sent: the stream cannot carry another request.
                self.assertTrue(closed, raw)


# --- responses from backends -------------------------------------------------------

class BackendResponseTest(ScriptedCase):
    """Responses from (untrusted) backends."""

    def bad_response_gives_502(self, name: str) -> None:
        path = f"/resp/{name}"
        client = Client(self, self.port)
        response = client.request(get(path))
        self.assertEqual(response.status, 502, response.raw_head + response.body)
        self.assertNotIn(b"hello", response.body)
        self.assert_backend_connection_closed(path)
        # A following request works, on a new backend connection.
        follow = f"{path}/after"
        try:
            response = client.request(get(follow))
        except (ConnectionError, OSError):  # the balancer may close after a 502
            response = http_exchange(self.port, get(follow))
        self.assert_echo(response, follow)
        self.assertNotEqual(self.script.seen(follow).record_id, self.script.seen(path).record_id,
                            "the backend connection was reused after a bad response")

    def test_two_different_content_lengths_502(self) -> None:
        for name in ("two-cl", "cl-list"):
            with self.subTest(name):
                self.bad_response_gives_502(name)

    def test_transfer_encoding_not_ending_in_chunked_502(self) -> None:
        for name in ("te-gzip", "te-chunked-gzip", "te-identity"):
            with self.subTest(name):
                self.bad_response_gives_502(name)

    def test_invalid_status_line_502(self) -> None:
        for name in ("status-4digit", "status-letters", "status-http2", "status-garbage",
                     "status-version"):
            with self.subTest(name):
                self.bad_response_gives_502(name)

    def test_cr_lf_or_nul_inside_a_value_502(self) -> None:
        for name in ("cr-in-value", "lf-in-value", "nul-in-value"):
            with self.subTest(name):
                self.bad_response_gives_502(name)

    def test_cl_and_te_uses_chunked_and_drops_cl(self) -> None:
        path = "/resp/cl-te"
        client = Client(self, self.port)
        response = client.request(get(path))
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        self.assertEqual(response.body, b"hello world")
        self.assertNotIn("100", response.header_all("content-length"))
        self.assertFalse(response.header("content-length") and response.header("transfer-encoding"),
                         response.raw_head)
        # The excess ("smuggled" response) is discarded with the connection.
        self.assert_backend_connection_closed(path)
        follow = "/resp/cl-te/after"
        self.assert_echo(client.request(get(follow)), follow)
        self.assertNotEqual(self.script.seen(follow).record_id, self.script.seen(path).record_id)

    def test_obs_fold_in_backend_header_never_passed_raw(self) -> None:
        client = Client(self, self.port)
        response = client.request(get("/resp/obs-fold"))
        lines = response.raw_head.split(b"\r\n")
        self.assertFalse([line for line in lines if line[:1] in (b" ", b"\t")], response.raw_head)
        if response.status == 200:
            self.assertEqual(response.header("x-folded"), "first second")
            self.assertEqual(response.body, b"ok")
        else:
            self.assertEqual(response.status, 502)

    def test_head_response_with_body_from_backend(self) -> None:
        client = Client(self, self.port)
        client.send(get("/resp/head-body", method="HEAD"))
        response = client.response("HEAD")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(response.header("content-length"), "5")
        self.assert_echo(client.request(get("/resp/head-body/after")), "/resp/head-body/after")

    def test_bodyless_response_body_never_answers_the_next_request(self) -> None:
        # The stray body of a HEAD/304 answer is itself a complete response: if
        # the backend connection is reused, the next client gets it (response
        # desync).  Each case uses a fresh client connection.
        for name, method, status in (("head-smuggle", "HEAD", 200), ("304-smuggle", "GET", 304)):
            with self.subTest(name):
                client = Client(self, self.port)
                client.send(get(f"/resp/{name}", method=method))
                response = client.response(method)
                self.assertEqual((response.status, response.body), (status, b""))
                follow = f"/resp/{name}/after"
                response = Client(self, self.port).request(get(follow))
                self.assertNotEqual(response.body, b"smuggled",
                                    "the next request got the stray body of the previous answer")
                self.assert_echo(response, follow)

    def test_204_and_304_with_body_from_backend(self) -> None:
        for name, status in (("204-body", 204), ("304-body", 304), ("304-chunked", 304)):
            with self.subTest(name):
                client = Client(self, self.port)
                response = client.request(get(f"/resp/{name}"))
                self.assertEqual(response.status, status)
                self.assertIsNone(response.header("transfer-encoding"))
                if status == 204:
                    self.assertIsNone(response.header("content-length"))
                follow = f"/resp/{name}/after"
                self.assert_echo(client.request(get(follow)), follow)

    def test_interim_responses_skipped(self) -> None:
        client = Client(self, self.port)
        client.send(get("/resp/interim"))
        response = client.response()
        self.assertEqual(response.status, 200, response.raw_head)
        self.assertEqual(response.body, b"final")
        self.assertNotIn(b"Early Hints", response.raw_head)
        self.assertIsNone(response.header("link"))
        self.assert_echo(client.request(get("/resp/interim/after")), "/resp/interim/after")

    def test_backend_closing_before_end_of_large_body(self) -> None:
        # Streamed (over the buffer limit): head already sent, then a short body and a close.
        client = Client(self, self.port)
        response = client.request(get("/resp/truncated-large"))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-length"), "1000000")
        self.assertFalse(response.complete, "a short body must never look complete")
        self.assertEqual(response.body, b"x" * 1000)
        self.assertTrue(client.closed()[1])

    def test_backend_closing_before_end_of_small_body(self) -> None:
        # Buffered (small) body: the client must get either the bytes that
        # arrived followed by a close, or a 502 -- not an empty reply, and never
        # a complete-looking short 200.
        raw, closed = send_and_collect(self.port, get("/resp/truncated-small", "Connection: close"))
        self.assertTrue(raw, "the client got an empty reply (closed without any response)")
        response = parse_responses(raw)[0]
        if response.status == 200:
            self.assertFalse(response.complete, raw)
            self.assertEqual(response.body, b"x" * 10)
            self.assertTrue(closed)
        else:
            self.assertEqual(response.status, 502, raw)

    def test_backend_closing_inside_a_chunked_body(self) -> None:
        raw, closed = send_and_collect(self.port, get("/resp/truncated-chunked"))
        self.assertTrue(closed)
        self.assertTrue(raw, "empty reply")
        response = parse_responses(raw)[0]
        if response.status == 200:
            self.assertFalse(response.complete, f"a cut-off body looks complete: {raw!r}")
        else:
            self.assertEqual(response.status, 502, raw)

    def test_close_delimited_response_rechunked_for_http11(self) -> None:
        client = Client(self, self.port)
        response = client.request(get("/resp/close-delimited"))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("transfer-encoding"), "chunked")
        self.assertIsNone(response.header("content-length"))
        self.assertTrue(response.complete)
        self.assertEqual(response.body, b"hello, close-delimited world")
        follow = "/resp/close-delimited/after"
        self.assert_echo(client.request(get(follow)), follow)

    def test_close_delimited_response_ends_by_close_for_http10(self) -> None:
        raw, closed = send_and_collect(self.port, b"GET /resp/close-delimited HTTP/1.0\r\n\r\n")
        self.assertTrue(closed)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 ") or head.startswith(b"HTTP/1.0 200 "), raw)
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertNotIn(b"keep-alive", head.lower())
        self.assertEqual(body, b"hello, close-delimited world")


# --- limits and timeouts ---------------------------------------------------------------

class LimitsTest(ScriptedCase):
    balancer_args = ("--max-header-size", "4k", "--max-request-line", "1k",
                     "--max-headers", "20", "--max-body-size", "64k")

    def test_within_limits_is_served(self) -> None:
        fields = [f"X-H{i}: {'v' * 100}" for i in range(15)]
        client = Client(self, self.port)
        self.assert_echo(client.request(request_with(fields, line="GET /limits/ok HTTP/1.1")),
                         "/limits/ok")
        self.assert_echo(client.request(post("/limits/body", b"x" * 60000)), "/limits/body", "POST")

    def test_header_section_too_large_431(self) -> None:
        fields = [f"X-H{i}: {'v' * 600}" for i in range(10)]
        self.assert_rejected(request_with(fields, line="GET /big HTTP/1.1"), (431,))

    def test_header_line_too_long_431(self) -> None:
        self.assert_rejected(request_with([f"X-Long: {'v' * 2000}"], line="GET /big HTTP/1.1"),
                             (431,))

    def test_target_too_long_414(self) -> None:
        self.assert_rejected(get("/" + "a" * 2000), (414,))

    def test_too_many_headers_431(self) -> None:
        fields = [f"X-H{i}: v" for i in range(25)]
        self.assert_rejected(request_with(fields, line="GET /many HTTP/1.1"), (431,))

    def test_content_length_over_limit_413_before_the_body(self) -> None:
        for extra in ((), ("Expect: 100-continue",)):
            with self.subTest(extra=extra):
                mark = backend_mark(self.backend)
                # Only the head is sent: the 413 must not wait for the body.
                raw, closed = send_and_collect(
                    self.port, get("/too-big", "Content-Length: 70000", *extra, method="POST"))
                self.assertNotIn(b"100 Continue", raw)
                self.assertEqual([r.status for r in parse_responses(raw)], [413], raw)
                self.assertTrue(closed)
                self.assert_backend_untouched(mark)

    def test_chunked_body_over_limit_413(self) -> None:
        path = "/too-big-chunked"
        piece = b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
        raw, closed = send_and_collect(self.port, chunked_request(path, piece * 2 + b"8000\r\n"))
        self.assertEqual([r.status for r in parse_responses(raw)], [413], raw[:300])
        self.assertTrue(closed)
        self.assert_never_complete(path, "oversized chunked body")


class TimeoutsTest(ScriptedCase):
    balancer_args = ("--header-timeout", "1", "--keepalive-timeout", "0.5",
                     "--read-timeout", "0.5", "--body-timeout", "0.5")

    def test_client_silent_while_sending_a_body(self) -> None:
        # README: the connection closes; --help says "408 after".  Either is
        # accepted, but not a response that looks like the backend's, and the
        # backend must never get a complete request.
        cases = {
            "small content-length": post("/stall/small", b"x" * 100)[:-90],
            "large content-length": post("/stall/large", b"x" * 300000)[:-1000],
            "chunked": chunked_request("/stall/chunked", b"5\r\nhello\r\n"),
        }
        for name, data in cases.items():
            with self.subTest(name):
                path = data.split(b" ")[1].decode()
                started = time.monotonic()
                raw, closed = send_and_collect(self.port, data, timeout=3)
                self.assertTrue(closed, "connection still open after 3 s")
                self.assertLess(time.monotonic() - started, 2.0)
                self.assertIn([r.status for r in parse_responses(raw)], ([], [408]), raw[:300])
                self.assert_never_complete(path, name)

    def test_slowloris_gets_408_for_whole_header_section(self) -> None:
        mark = backend_mark(self.backend)
        payload = get("/slow", "X-Slow: " + "s" * 40)
        sock = connect(self.port)
        self.addCleanup(sock.close)
        started = time.monotonic()
        answered = False
        for byte in payload:  # one byte every 0.3 s: no single gap reaches the 1 s timeout
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], 0.3)
            if readable:
                answered = True
                break
        self.assertTrue(answered, "no answer while dripping the whole head")
        raw, closed = collect_until_close(sock, 3)
        elapsed = time.monotonic() - started
        self.assertEqual([r.status for r in parse_responses(raw)], [408], raw)
        self.assertTrue(closed)
        self.assertLess(elapsed, 1.6, "the header timeout must cover the whole header section")
        self.assertGreater(elapsed, 0.9)
        self.assert_backend_untouched(mark)

    def test_idle_keepalive_connection_is_closed(self) -> None:
        client = Client(self, self.port)
        self.assert_echo(client.request(get("/idle")), "/idle")
        started = time.monotonic()
        rest, closed = client.closed(timeout=3)
        self.assertEqual(rest, b"")
        self.assertTrue(closed, "idle keep-alive connection still open after 3 s")
        self.assertLess(time.monotonic() - started, 1.5)

    def test_idle_connection_without_request_is_closed(self) -> None:
        sock = connect(self.port)
        self.addCleanup(sock.close)
        started = time.monotonic()
        raw, closed = collect_until_close(sock, 3)
        self.assertTrue(closed)
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertIn(raw[:12], (b"", b"HTTP/1.1 408"))

    def test_backend_read_timeout_504(self) -> None:
        client = Client(self, self.port)
        started = time.monotonic()
        response = client.request(get("/resp/hang"))
        elapsed = time.monotonic() - started
        self.assertEqual(response.status, 504)
        self.assertGreater(elapsed, 0.4)
        self.assertLess(elapsed, 2.5)
        # The client connection is still good for the next request.
        try:
            response = client.request(get("/after-hang"))
        except (ConnectionError, OSError):
            response = http_exchange(self.port, get("/after-hang"))
        self.assert_echo(response, "/after-hang")


class Blackhole:
    """A listener whose accept queue is full: connecting to it times out (SYN dropped)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(20):
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", self.port))
            except (socket.timeout, TimeoutError):
                probe.close()
                self.works = True
                return
            except OSError:
                probe.close()
                break
            self.fillers.append(probe)
        self.works = False

    def close(self) -> None:
        for sock in self.fillers:
            sock.close()
        self.listener.close()


class ConnectTimeoutTest(unittest.TestCase):
    def test_connect_timeout_retries_on_another_backend(self) -> None:
        blackhole = Blackhole()
        self.addCleanup(blackhole.close)
        if not blackhole.works:
            self.skipTest("cannot make a connect() time out on this machine")
        script = Script(SCRIPTED_ROUTES)
        backend = RawBackend(script)
        self.addCleanup(backend.stop)
        balancer = Balancer([f"http://127.0.0.1:{blackhole.port}", backend.port], *BASE_ARGS,
                            "--connect-timeout", "0.3")
        self.addCleanup(balancer.stop)
        durations = []
        for i in range(4):
            started = time.monotonic()
            response = http_exchange(balancer.port, get(f"/ct/{i}", "Connection: close"))
            durations.append(time.monotonic() - started)
            self.assertEqual(response.status, 200, response.raw_head + response.body)
            self.assertEqual(echo_of(response)["path"], f"/ct/{i}")
            self.assertLess(durations[-1], 2.0)
        # Round robin sent one of the first two to the black hole: it timed out and was retried.
        self.assertGreater(max(durations[:2]), 0.25, durations)
        self.assertEqual(sorted(s.path for s in script.served), [f"/ct/{i}" for i in range(4)])
        self.assertNotIn("Traceback", balancer.log_text())


def settled_threads(pid: int) -> int:
    """The thread count once handler threads of earlier tests have ended."""
    counts: list[int] = []

    def stable() -> bool:
        counts.append(process_threads(pid))
        return len(counts) >= 5 and len(set(counts[-5:])) == 1
    wait_for(stable, 10, interval=0.05, message="the thread count to settle")
    return counts[-1]


class MaxConnectionsTest(ScriptedCase):
    balancer_args = ("--max-connections", "20", "--keepalive-timeout", "30",
                     "--header-timeout", "30")

    def test_over_the_limit_gets_fast_503_and_threads_stay_bounded(self) -> None:
        """20 connections busy with slow request heads: the rest get a fast 503."""
        threads_before = settled_threads(self.balancer.pid)
        busy = []
        for _ in range(20):
            sock = connect(self.port)
            self.addCleanup(sock.close)
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: test.invalid\r\n")  # head never ends
            busy.append(sock)
        wait_for(lambda: process_threads(self.balancer.pid) >= threads_before + 20, 5,
                 message="20 handler threads")
        extra = []
        for _ in range(30):
            sock = connect(self.port)
            self.addCleanup(sock.close)
            extra.append(sock)

        def answered() -> list[socket.socket]:
            readable, _, _ = select.select(extra, [], [], 0)
            return readable if len(readable) == 30 else []
        rejected = wait_for(answered, 5, message="30 connections over the limit answered")
        for sock in rejected:
            raw, closed = collect_until_close(sock, 2)
            self.assertEqual([r.status for r in parse_responses(raw)], [503], raw)
            self.assertTrue(closed)
        # A new client is turned away fast (not queued behind slow connections).
        started = time.monotonic()
        raw, closed = send_and_collect(self.port, get("/new"), timeout=3)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual([r.status for r in parse_responses(raw)], [503], raw)
        self.assertTrue(closed)
        self.assertLess(process_threads(self.balancer.pid), threads_before + 20 + 5)
        # Once the slow connections go, new clients are served normally.
        for sock in busy:
            sock.close()

        def served() -> bool:
            raw, _ = send_and_collect(self.port, get("/served", "Connection: close"), timeout=2)
            return raw.startswith(b"HTTP/1.1 200 ")
        wait_for(served, 5, interval=0.05, message="a new client to be served")
        wait_for(lambda: process_threads(self.balancer.pid) <= threads_before + 1, 5,
                 message="handler threads to end")

    def test_idle_connections_are_reclaimed_for_new_clients(self) -> None:
        """At the limit with only idle keep-alive connections, a new client is served, not refused."""
        idle = []
        for _ in range(20):
            sock = connect(self.port)
            self.addCleanup(sock.close)
            sock.sendall(get("/warm"))  # one request each, then the connection idles
            idle.append(sock)
        for sock in idle:
            with sock.makefile("rb") as reader:
                self.assertEqual(read_response(reader).status, 200)
        started = time.monotonic()
        raw, closed = send_and_collect(self.port, get("/new", "Connection: close"), timeout=3)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual([r.status for r in parse_responses(raw)], [200], raw)

        def one_closed() -> bool:
            readable, _, _ = select.select(idle, [], [], 0)
            return any(sock.recv(1, socket.MSG_PEEK) == b"" for sock in readable)
        wait_for(one_closed, 5, message="an idle connection to be closed to make room")


# --- robustness ---------------------------------------------------------------------

def bad_inputs() -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = [("CL.TE", SMUGGLE_CL_TE), ("TE.CL", SMUGGLE_TE_CL)]
    cases += [(f"CL {n}", request_with(f, b"hello!")) for n, f in BAD_CONTENT_LENGTHS.items()]
    cases += [(f"TE {n}", request_with(f, b"5\r\nhello\r\n0\r\n\r\n"))
              for n, f in BAD_TRANSFER_ENCODINGS.items()]
    cases += [(f"chunk {n}", chunked_request("/b", b)) for n, b in BAD_CHUNKED_BODIES.items()]
    cases += [(f"field {n}", request_with(f, line="GET /b HTTP/1.1")) for n, f in BAD_FIELDS.items()]
    cases += [(f"line {n}", p) for n, (p, _) in BAD_REQUEST_LINES.items()]
    cases += [(f"host {n}", p) for n, p in BAD_HOSTS.items()]
    cases += [(f"resp {n}", get(f"/resp/{n}", "Connection: close")) for n in RAW_RESPONSES]
    cases += [
        ("head cut", b"GET / HTTP/1.1\r\nHost: a\r\nX-"),
        ("body cut", post("/b", b"hello")[:-3]),
        ("chunk cut", chunked_request("/b", b"10\r\nabc")),
        ("empty cut", b""),
        ("too large head", request_with([f"X-H{i}: {'v' * 1000}" for i in range(40)])),
        ("long target", get("/" + "a" * 9000)),
        ("many fields", request_with([f"X-H{i}: v" for i in range(120)])),
        ("body too large", get("/b", "Content-Length: 20000000", method="POST")),
    ]
    return cases


class RobustnessTest(ScriptedCase):
    balancer_args = ("--access-log", "-")

    def test_burst_of_bad_requests_leaves_no_trace(self) -> None:
        pid = self.balancer.pid
        client = Client(self, self.port)
        self.assert_echo(client.request(get("/warmup")), "/warmup")
        with_handler = process_threads(pid)
        client.close()
        wait_for(lambda: process_threads(pid) < with_handler, 5, message="warm-up thread to end")
        threads_before, fds_before = process_threads(pid), process_fds(pid)
        cases = bad_inputs()
        burst = (cases * (200 // len(cases) + 1))[:max(200, len(cases))]
        errors: list[str] = []

        def worker(items: list[tuple[str, bytes]]) -> None:
            for name, data in items:
                try:
                    with connect(self.port, 5) as sock:
                        if data:
                            sock.sendall(data)
                        sock.shutdown(socket.SHUT_WR) if name.endswith("cut") else None
                        raw, closed = collect_until_close(sock, 5)
                        if not closed:
                            errors.append(f"{name}: connection left open")
                except OSError:
                    pass
        workers = [threading.Thread(target=worker, args=(burst[i::4],)) for i in range(4)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(60)
        self.assertEqual(errors, [])
        # Still serving correctly.
        client = Client(self, self.port)
        self.assert_echo(client.request(get("/after-burst")), "/after-burst")
        self.assert_echo(client.request(post("/after-burst/post", b"abc")), "/after-burst/post",
                         "POST")
        client.close()
        wait_for(lambda: process_threads(pid) <= threads_before, 5,
                 message=f"threads back to {threads_before} (now {process_threads(pid)})")
        wait_for(lambda: process_fds(pid) <= fds_before + 3, 5,
                 message=f"fds back to {fds_before} (now {process_fds(pid)})")
        log = self.balancer.log_text()
        self.assertNotIn("Traceback", log, log[-3000:])


# --- streaming -------------------------------------------------------------------------

def reset_peak_rss(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def iter_chunked(reader) -> Iterator[bytes]:
    while True:
        line = reader.readline(1026)
        if not line.endswith(b"\r\n"):
            raise AssertionError(f"bad chunk size line {line!r}")
        size = int(line[:-2].split(b";")[0], 16)
        if size == 0:
            while reader.readline() not in (b"\r\n", b""):
                pass
            return
        remaining = size
        while remaining:
            data = reader.read1(min(remaining, 256 * 1024))
            if not data:
                raise AssertionError("connection closed inside a chunk")
            remaining -= len(data)
            yield data
        if reader.read(2) != b"\r\n":
            raise AssertionError("chunk not followed by CRLF")


def read_status_and_fields(reader) -> tuple[int, dict[str, str]]:
    """(status, {lower-case name: value}) of a response head; the body stays in ``reader``."""
    status = int(reader.readline().split(b" ")[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


class StreamingTest(unittest.TestCase):
    """200 MiB each way, and a streamed gzip, with the balancer's memory bounded."""

    MAX_GROWTH_KIB = 32 * 1024

    @classmethod
    def setUpClass(cls) -> None:
        cls.script = Script(SCRIPTED_ROUTES)
        cls.backend = RawBackend(cls.script)
        cls.addClassCleanup(cls.backend.stop)

    def setUp(self) -> None:
        # One balancer per test: each measures its own peak memory.
        self.balancer = Balancer([self.backend.port], *BASE_ARGS, "--max-body-size", "1G")
        self.addCleanup(self.balancer.stop)
        self.assertEqual(http_exchange(self.balancer.port, get("/warmup")).status, 200)
        pid = self.balancer.pid
        self.exact_peak = reset_peak_rss(pid)
        self.rss_before = process_rss_kib(pid) if self.exact_peak else process_peak_rss_kib(pid)

    def tearDown(self) -> None:
        self.assertNotIn("Traceback", self.balancer.log_text())

    def assert_memory_bounded(self, what: str) -> None:
        growth = process_peak_rss_kib(self.balancer.pid) - self.rss_before
        self.assertLess(growth, self.MAX_GROWTH_KIB,
                        f"{what}: the balancer's peak RSS grew by {growth} KiB")

    def test_download_200_mib(self) -> None:
        client = Client(self, self.balancer.port, timeout=30)
        client.send(get("/stream/download"))
        status, headers = read_status_and_fields(client.reader)
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("content-length"), str(DOWNLOAD_SIZE))
        crc = got = 0
        while got < DOWNLOAD_SIZE:
            data = client.reader.read1(min(DOWNLOAD_SIZE - got, 1024 * 1024))
            if not data:
                break
            got += len(data)
            crc = zlib.crc32(data, crc)
        self.assertEqual(got, DOWNLOAD_SIZE)
        self.assertEqual(crc, pattern_crc(DOWNLOAD_SIZE, _BLOCK))
        self.assert_memory_bounded("download")
        self.assert_echo_after(client)

    def test_upload_200_mib(self) -> None:
        for name in ("content-length", "chunked"):
            with self.subTest(name):
                path = f"/stream/upload/{name}"
                client = Client(self, self.balancer.port, timeout=30)
                if name == "content-length":
                    client.send(get(path, f"Content-Length: {UPLOAD_SIZE}", method="POST"))
                    for piece in pattern(UPLOAD_SIZE, _BLOCK):
                        client.sock.sendall(piece)
                else:
                    client.send(get(path, "Transfer-Encoding: chunked", method="POST"))
                    for piece in pattern(UPLOAD_SIZE, _BLOCK):
                        client.sock.sendall(b"%x\r\n" % len(piece))
                        client.sock.sendall(piece)
                        client.sock.sendall(b"\r\n")
                    client.sock.sendall(b"0\r\n\r\n")
                response = client.response()
                self.assertEqual(response.status, 200, response.raw_head + response.body)
                seen = self.script.seen(path)
                self.assertEqual(seen.length, UPLOAD_SIZE)
                self.assertEqual(seen.crc, pattern_crc(UPLOAD_SIZE, _BLOCK))
                self.assert_memory_bounded(f"upload ({name})")
                self.assert_echo_after(client)

    def test_gzip_streamed(self) -> None:
        # Known length (Content-Length) and unknown length (chunked) from the backend.
        for path in ("/stream/gzip", "/stream/gzip-chunked"):
            with self.subTest(path):
                client = Client(self, self.balancer.port, timeout=30)
                client.send(get(path, "Accept-Encoding: gzip"))
                status, headers = read_status_and_fields(client.reader)
                self.assertEqual(status, 200)
                self.assertEqual(headers.get("content-encoding"), "gzip")
                self.assertEqual(headers.get("transfer-encoding"), "chunked")
                self.assertNotIn("content-length", headers)
                inflate = zlib.decompressobj(31)
                crc = size = wire = 0
                for data in iter_chunked(client.reader):
                    wire += len(data)
                    plain = inflate.decompress(data)
                    size += len(plain)
                    crc = zlib.crc32(plain, crc)
                plain = inflate.flush()
                size += len(plain)
                crc = zlib.crc32(plain, crc)
                self.assertTrue(inflate.eof, "gzip stream not finished")
                self.assertEqual(size, GZIP_SIZE)
                self.assertEqual(crc, pattern_crc(GZIP_SIZE, _TEXT_BLOCK))
                self.assertLess(wire, GZIP_SIZE // 4, "the response was not compressed")
                self.assert_memory_bounded(f"gzip {path}")
                self.assert_echo_after(client)

    def assert_echo_after(self, client: Client) -> None:
        response = client.request(get("/stream-after"))
        self.assertEqual(response.status, 200)
        self.assertEqual(echo_of(response)["path"], "/stream-after")


if __name__ == "__main__":
    unittest.main()
