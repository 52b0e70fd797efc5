"""Regression tests for the review fixes (commit "Review fixes: ...").

One test (or a few) per fixed behaviour, numbered as in the review:

1. bytes a backend sends after a HEAD answer never reach another client;
2. a client resetting an ``Expect: 100-continue`` upload takes no backend DOWN;
3. a TRACE body is never read as a next request;
4. a backend answering an upload early (413, then close) is relayed, not 502;
5. ``in_flight`` is never released twice (admin ``/status`` shows 0, not -1);
6. HTTP/1.0 keep-alive + gzip of a large body is close-delimited;
7. absolute-form targets are checked (400) and rewritten (Host);
8. ``Connection: host`` keeps Host; a 1.0 request without Host gets one;
10. a slow gzipped stream is flushed per piece; SSE is never compressed;
11. an invalid Content-Length on a HEAD/304 answer is a 502;
12. a dead pooled connection on a POST takes no backend DOWN;
13. a status line over 16 KiB is one 502; 150 Set-Cookie fields pass intact;
14. an empty line before the request line is ignored;
15. HEAD and 304 answers carry the fields the gzipped 200 would carry.

(9, idle keep-alive connections reclaimed at --max-connections, is covered
by ``test_hardening.MaxConnectionsTest``.)

Real ``cclb.py`` processes and raw sockets on both sides; the pure
``http11`` functions behind some fixes are tested directly too.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
import unittest
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import http11  # noqa: E402
from tests.support import (BASE_ARGS, Balancer, BalancerCase, Client, RawBackend, Script,  # noqa: E402
                           Seen, backend_mark, collect_until_close, connect, get, heads_since,
                           http_exchange, parse_responses, post, read_head, request_head_fields,
                           send_and_collect, wait_admin_port, wait_for)

KiB = 1024
MiB = 1024 * KiB

_TEXT = b"".join(b"line %06d: the quick brown fox jumps over the lazy dog\n" % i
                 for i in range(6000))
BIG_TEXT = _TEXT[:300 * KiB]  # over the 256 KiB buffering limit: streamed
assert len(BIG_TEXT) == 300 * KiB


# --- small helpers ------------------------------------------------------------------

def head_values(head: bytes, name: bytes) -> list[bytes]:
    """Values of field ``name`` (lower-case bytes) in a request head the backend got."""
    return [value for field, value in request_head_fields(head)[2] if field == name]


def split_head(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, fields, rest) of raw response bytes (no body framing applied)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete response head in {raw[:300]!r}")
    lines = head.decode("latin-1").split("\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.append((name.strip().lower(), value.strip()))
    return int(lines[0].split(" ")[1]), fields, rest


def field(fields: list[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in fields if key == name), None)


def chunked_pieces(reader):
    """Yield the data of each chunk of a chunked body as it arrives."""
    while True:
        line = reader.readline()
        if not line:
            raise AssertionError("connection closed inside a chunked body")
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while reader.readline() not in (b"\r\n", b""):
                pass
            return
        data = reader.read(size)
        if reader.read(2) != b"\r\n":
            raise AssertionError("chunk not followed by CRLF")
        yield data


def set_linger_reset(sock: socket.socket) -> None:
    """close() will send a RST (SO_LINGER on, timeout 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def raw_answer(raw: bytes, keep: bool = True):
    def answer(conn: socket.socket, seen: Seen) -> bool:
        conn.sendall(raw)
        return keep
    return answer


# =====================================================================================
# One balancer, one scripted backend
# =====================================================================================

SLOW_PIECES = [b"".join(b"piece %d line %03d: the quick brown fox jumps\n" % (k, i)
                        for i in range(40)) for k in range(4)]
SSE_BODY = b"".join(b"id: %d\ndata: event number %d\n\n" % (i, i) for i in range(150))
SET_COOKIES = [f"c{i:03d}=value-{i}; Path=/; HttpOnly" for i in range(150)]


class ScriptedCase(BalancerCase):
    """The shared-balancer tests; routes added to the ``Script`` of test_hardening."""

    # filled by the /slow-chunks and /sse-slow routes: when the backend sent what
    slow_sent: dict[str, float] = {}

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.slow_sent = {}
        big_cl = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(BIG_TEXT), BIG_TEXT))
        big_chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + b"".join(http11.chunk(BIG_TEXT[i:i + 64 * KiB])
                                  for i in range(0, len(BIG_TEXT), 64 * KiB)) + b"0\r\n\r\n")
        small_json = b'{"items": [' + b", ".join(b'"item %d"' % i for i in range(200)) + b"]}"
        cookies = "".join(f"Set-Cookie: {c}\r\n" for c in SET_COOKIES).encode()
        cls.script.routes.update({
            "/big-text": raw_answer(big_cl),
            "/big-text-chunked": raw_answer(big_chunked),
            "/small-json": raw_answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(small_json), small_json)),
            "/slow-chunks": cls._slow_chunks,
            "/slow-length": cls._slow_length,
            "/sse": raw_answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(SSE_BODY), SSE_BODY)),
            "/sse-slow": cls._sse_slow,
            "/head-two-cl": raw_answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                       b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n"),
            "/head-cl-abc": raw_answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                       b"Content-Length: abc\r\n\r\n"),
            "/304-cl-abc": raw_answer(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n"
                                      b"Content-Length: abc\r\n\r\n"),
            "/cookies": raw_answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + cookies
                                   + b"Content-Length: 2\r\n\r\nok"),
            "/head-json": raw_answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"ETag: \"big\"\r\nContent-Length: 5000\r\n\r\n"),
            "/etag-304": raw_answer(b"HTTP/1.1 304 Not Modified\r\nETag: \"abc\"\r\n"
                                    b"Content-Type: application/json\r\n\r\n"),
        })

    @classmethod
    def _slow_chunks(cls, conn: socket.socket, seen: Seen) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for index, piece in enumerate(SLOW_PIECES):
            if index:
                time.sleep(0.3)  # the pacing is what the test is about
            if index == len(SLOW_PIECES) - 1:
                cls.slow_sent["last"] = time.monotonic()
            conn.sendall(http11.chunk(piece))
        conn.sendall(b"0\r\n\r\n")
        return True

    @classmethod
    def _slow_length(cls, conn: socket.socket, seen: Seen) -> bool:
        """Like /slow-chunks, length-delimited (over the buffering limit, so streamed)."""
        tail = BIG_TEXT[:300 * KiB - sum(map(len, SLOW_PIECES[:-1]))]
        pieces = SLOW_PIECES[:-1] + [tail]
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Length: %d\r\n\r\n" % sum(map(len, pieces)))
        for index, piece in enumerate(pieces):
            if index:
                time.sleep(0.3)  # the pacing is what the test is about
            if index == len(pieces) - 1:
                cls.slow_sent["last"] = time.monotonic()
            conn.sendall(piece)
        return True

    @classmethod
    def _sse_slow(cls, conn: socket.socket, seen: Seen) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        conn.sendall(http11.chunk(b"data: first\n\n" * 40))
        time.sleep(0.3)
        cls.slow_sent["sse-second"] = time.monotonic()
        conn.sendall(http11.chunk(b"data: second\n\n") + b"0\r\n\r\n")
        return True

    def heads_for(self, path: str) -> list[bytes]:
        needle = f" {path} ".encode()
        with self.backend.lock:
            return [head for head in self.backend.heads if needle in head.split(b"\r\n", 1)[0]]

    # --- 3. TRACE with a body -------------------------------------------------------

    def test_03_trace_body_is_never_a_request(self) -> None:
        """TRACE + a body holding a request: one 405, close; /smuggled never reaches the backend."""
        inner = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        cases = {
            "content-length": b"TRACE / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(inner), inner),
            "chunked": b"TRACE / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + http11.chunk(inner) + b"0\r\n\r\n",
            "content-length, keep-alive client": b"TRACE / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive"
                                                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(inner), inner),
        }
        for name, data in cases.items():
            with self.subTest(name):
                response = self.assert_rejected(data, (405,), name)
                self.assertIn("close", (response.header("Connection") or "").lower())
        self.assertNotIn(b"/smuggled", self.backend.received())

    # --- 6. HTTP/1.0 keep-alive + gzip ---------------------------------------------

    def test_06_http10_keepalive_gzip_of_a_large_body_ends_by_close(self) -> None:
        for path in ("/big-text", "/big-text-chunked"):
            with self.subTest(path):
                request = (b"GET %s HTTP/1.0\r\nAccept-Encoding: gzip\r\nConnection: keep-alive\r\n\r\n"
                           % path.encode())
                raw, closed = send_and_collect(self.port, request, timeout=5)
                status, fields, body = split_head(raw)
                self.assertEqual(status, 200, raw[:300])
                self.assertEqual(field(fields, "content-encoding"), "gzip")
                self.assertIsNone(field(fields, "content-length"), raw[:300])
                self.assertIsNone(field(fields, "transfer-encoding"), raw[:300])
                self.assertEqual((field(fields, "connection") or "").lower(), "close", raw[:300])
                self.assertTrue(closed, "the balancer must close to end the body")
                self.assertEqual(zlib.decompress(body, 31), BIG_TEXT)

    def test_06_http10_keepalive_gzip_of_a_small_body_keeps_the_connection(self) -> None:
        """The fix does not over-close: a buffered gzip body has a length and stays keep-alive."""
        client = Client(self, self.port)
        for _ in range(2):
            response = client.request(b"GET /small-json HTTP/1.0\r\nAccept-Encoding: gzip\r\n"
                                      b"Connection: keep-alive\r\n\r\n")
            self.assertEqual(response.status, 200)
            self.assertEqual(response.header("Content-Encoding"), "gzip")
            self.assertEqual(int(response.header("Content-Length")), len(response.body))
            self.assertEqual((response.header("Connection") or "").lower(), "keep-alive")
            self.assertTrue(zlib.decompress(response.body, 31).startswith(b'{"items": ["item 0"'))

    # --- 7. absolute-form targets --------------------------------------------------

    def test_07_malformed_absolute_form_targets_are_400(self) -> None:
        for target in (b"http://[x/", b"http://user:pw@evil/", b"http:///x"):
            with self.subTest(target):
                self.assert_rejected(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target, (400,), target)
        self.assertNotIn("Traceback", self.balancer.log_text())

    def test_07_valid_absolute_form_rewrites_target_and_host(self) -> None:
        response = http_exchange(self.port, b"GET http://example.com:8080/abs/p?q=1 HTTP/1.1\r\n"
                                            b"Host: other\r\nConnection: close\r\n\r\n")
        self.assert_echo(response, "/abs/p?q=1")
        seen = self.script.seen("/abs/p?q=1")
        self.assertTrue(seen.head.startswith(b"GET /abs/p?q=1 HTTP/1.1\r\n"), seen.head)
        self.assertEqual(head_values(seen.head, b"host"), [b"example.com:8080"], seen.head)
        self.assertNotIn(b"other", seen.head.split(b"\r\nX-Forwarded")[0])

    # --- 8. Host is kept ---------------------------------------------------------------

    def test_08_connection_host_does_not_strip_host(self) -> None:
        response = http_exchange(self.port, b"GET /conn-host HTTP/1.1\r\nHost: example.com\r\n"
                                            b"Connection: host\r\n\r\n")
        self.assert_echo(response, "/conn-host")
        head = self.script.seen("/conn-host").head
        self.assertEqual(head_values(head, b"host"), [b"example.com"], head)

    def test_08_http10_request_without_host_is_forwarded_with_a_host(self) -> None:
        response = http_exchange(self.port, b"GET /no-host HTTP/1.0\r\n\r\n")
        self.assert_echo(response, "/no-host")
        head = self.script.seen("/no-host").head
        self.assertEqual(len(head_values(head, b"host")), 1, head)

    # --- 10. streamed gzip is flushed; SSE is not compressed ----------------------

    def assert_slow_gzip_stream_flushed(self, path: str, expected: bytes) -> None:
        self.slow_sent.pop("last", None)
        client = Client(self, self.port, timeout=10)
        client.send(get(path, "Accept-Encoding: gzip"))
        head = read_head(client.reader)
        self.assertEqual(head.status, 200, head.raw_head)
        self.assertEqual(head.header("Content-Encoding"), "gzip", head.raw_head)
        self.assertEqual(head.header("Transfer-Encoding"), "chunked", head.raw_head)
        inflater = zlib.decompressobj(31)
        text = bytearray()
        first_at = None
        for data in chunked_pieces(client.reader):
            text += inflater.decompress(data)
            if first_at is None and SLOW_PIECES[0] in text:
                first_at = time.monotonic()
        text += inflater.flush()
        self.assertTrue(inflater.eof, "the gzip stream must be complete")
        self.assertEqual(bytes(text), expected)
        self.assertIsNotNone(first_at)
        self.assertLess(first_at, self.slow_sent["last"],
                        f"{path}: the first piece reached the client only after the backend sent "
                        f"the last one ({self.slow_sent['last'] - first_at:+.3f} s): the compressed "
                        f"stream was held back")

    def test_10_slow_chunked_gzip_stream_is_flushed_per_piece(self) -> None:
        """A chunk every 0.3 s: the first one decompresses at the client before the last is sent."""
        self.assert_slow_gzip_stream_flushed("/slow-chunks", b"".join(SLOW_PIECES))

    def test_10_slow_length_delimited_gzip_stream_is_flushed_per_piece(self) -> None:
        tail = BIG_TEXT[:300 * KiB - sum(map(len, SLOW_PIECES[:-1]))]
        self.assert_slow_gzip_stream_flushed("/slow-length", b"".join(SLOW_PIECES[:-1]) + tail)

    def test_10_event_stream_is_not_compressed(self) -> None:
        response = http_exchange(self.port, get("/sse", "Accept-Encoding: gzip", "Connection: close"))
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.header("Content-Encoding"), response.raw_head)
        self.assertEqual(response.body, SSE_BODY)

    def test_10_slow_event_stream_is_relayed_as_it_comes(self) -> None:
        self.slow_sent.pop("sse-second", None)
        client = Client(self, self.port, timeout=10)
        client.send(get("/sse-slow", "Accept-Encoding: gzip"))
        head = read_head(client.reader)
        self.assertIsNone(head.header("Content-Encoding"), head.raw_head)
        pieces = chunked_pieces(client.reader)
        first = next(pieces)
        got_first = time.monotonic()
        self.assertTrue(first.startswith(b"data: first\n\n"), first[:100])
        rest = b"".join(pieces)
        self.assertEqual(first + rest, b"data: first\n\n" * 40 + b"data: second\n\n")
        self.assertLess(got_first, self.slow_sent["sse-second"])

    # --- 11. invalid Content-Length on bodiless answers --------------------------------

    def test_11_invalid_content_length_on_head_answer_is_502(self) -> None:
        for path in ("/head-two-cl", "/head-cl-abc"):
            with self.subTest(path):
                response = http_exchange(self.port, get(path, "Connection: close", method="HEAD"),
                                         method="HEAD")
                self.assertEqual(response.status, 502, response.raw_head)
                self.assertTrue(self.heads_for(path), f"{path} never reached the backend")

    def test_11_invalid_content_length_on_304_answer_is_502(self) -> None:
        response = http_exchange(self.port, get("/304-cl-abc", "Connection: close"))
        self.assertEqual(response.status, 502, response.raw_head)

    # --- 13. many Set-Cookie fields (the long status line: UploadFailuresTest) ------------

    def test_13_many_set_cookie_fields_are_relayed_intact(self) -> None:
        response = http_exchange(self.port, get("/cookies", "Connection: close"))
        self.assertEqual(response.status, 200, response.raw_head[:500])
        self.assertEqual(response.header_all("Set-Cookie"), SET_COOKIES)
        self.assertEqual(response.body, b"ok")

    # --- 14. leading empty line ----------------------------------------------------------

    def test_14_empty_line_before_the_request_line_is_ignored(self) -> None:
        raw, closed = send_and_collect(self.port, b"\r\nGET /leading-crlf HTTP/1.1\r\nHost: a\r\n"
                                                  b"Connection: close\r\n\r\n")
        responses = parse_responses(raw)
        self.assertEqual([r.status for r in responses], [200], raw)
        self.assert_echo(responses[0], "/leading-crlf")
        self.assertTrue(closed)

    def test_14_empty_line_between_keepalive_requests_is_ignored(self) -> None:
        """The common case: a client adds CRLF after a POST body."""
        client = Client(self, self.port)
        self.assert_echo(client.request(post("/crlf-1", b"hello") + b"\r\n"), "/crlf-1", "POST")
        self.assert_echo(client.request(get("/crlf-2")), "/crlf-2")

    # --- 15. HEAD and 304 fields match the gzipped 200 ------------------------------

    def test_15_head_gets_gzip_fields_and_no_content_length(self) -> None:
        client = Client(self, self.port)
        head = client.request(get("/head-json", "Accept-Encoding: gzip", method="HEAD"), "HEAD")
        self.assertEqual(head.status, 200, head.raw_head)
        self.assertEqual(head.header("Content-Encoding"), "gzip", head.raw_head)
        self.assertIn("accept-encoding", (head.header("Vary") or "").lower(), head.raw_head)
        self.assertIsNone(head.header("Content-Length"), head.raw_head)
        self.assertEqual(head.header("ETag"), 'W/"big"', head.raw_head)
        # Nothing follows the HEAD answer: the next response on the connection is its own.
        self.assert_echo(client.request(get("/after-head-json")), "/after-head-json")
        # Without gzip: identity fields and the backend's length.
        plain = client.request(get("/head-json", method="HEAD"), "HEAD")
        self.assertIsNone(plain.header("Content-Encoding"), plain.raw_head)
        self.assertEqual(plain.header("Content-Length"), "5000", plain.raw_head)
        self.assertEqual(plain.header("ETag"), '"big"', plain.raw_head)

    def test_15_304_gets_weak_etag_and_vary_for_gzip_clients(self) -> None:
        client = Client(self, self.port)
        response = client.request(get("/etag-304", 'If-None-Match: W/"abc"', "Accept-Encoding: gzip"))
        self.assertEqual(response.status, 304, response.raw_head)
        self.assertEqual(response.header("ETag"), 'W/"abc"', response.raw_head)
        self.assertIn("accept-encoding", (response.header("Vary") or "").lower(), response.raw_head)
        self.assertEqual(response.body, b"")
        self.assert_echo(client.request(get("/after-304")), "/after-304")
        # A client without gzip gets the identity representation's strong ETag.
        plain = client.request(get("/etag-304", 'If-None-Match: "abc"'))
        self.assertEqual(plain.status, 304, plain.raw_head)
        self.assertEqual(plain.header("ETag"), '"abc"', plain.raw_head)


# =====================================================================================
# 1. Bytes after a HEAD answer (own balancer: the test poisons backend connections)
# =====================================================================================

EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"


class HeadLeftoverTest(BalancerCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.script.routes["/head-late"] = cls._head_late
        cls.script.routes["/head-now"] = raw_answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n" + EVIL)

    @staticmethod
    def _head_late(conn: socket.socket, seen: Seen) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n")
        time.sleep(0.05)  # a second segment, 50 ms later: the delay is the point
        conn.sendall(EVIL)
        return True

    def assert_own_answer(self, client: Client, path: str) -> None:
        response = client.request(get(path))
        self.assertNotIn(b"EVIL", response.body, f"{path} got the bytes the backend sent after "
                                                 f"a HEAD answer: {response.raw_head + response.body!r}")
        self.assertEqual(response.status, 200, response.raw_head + response.body)
        self.assert_echo(response, path)

    def test_01_bytes_after_a_head_answer_never_reach_another_client(self) -> None:
        """HEAD answered with Content-Length: 5, then a whole extra response (late or at once)."""
        for round_ in range(2):
            for route in ("/head-late", "/head-now"):
                for who in ("other", "same"):
                    heads = Client(self, self.port)
                    head = heads.request(get(route, method="HEAD"), "HEAD")
                    self.assertEqual(head.status, 200, head.raw_head)
                    self.assertEqual(head.header("Content-Length"), "5", head.raw_head)
                    prefix = f"/after/{round_}{route}/{who}"
                    with self.subTest(f"{route}, {who} connection, right away (round {round_})"):
                        client = Client(self, self.port) if who == "other" else heads
                        self.assert_own_answer(client, f"{prefix}/now")
                    time.sleep(0.1)  # the stray bytes have surely arrived by now
                    with self.subTest(f"{route}, {who} connection, 100 ms later (round {round_})"):
                        self.assert_own_answer(Client(self, self.port), f"{prefix}/later")


# =====================================================================================
# Two backends: a passive failure would take one DOWN (and log it)
# =====================================================================================

class TwoBackendCase(BalancerCase):
    """Two RawBackends sharing one ``Script``, a fresh balancer per test.

    Per test, so that a backend wrongly taken DOWN (for ``--fail-timeout``
    10 s) fails only the test that did it.  The access log (stderr) bounds
    the wait for the application log.
    """

    @classmethod
    def setUpClass(cls) -> None:
        pass  # everything per test, in setUp

    def setUp(self) -> None:
        self.script = Script()
        self.early: list[bytes] = []
        self.script.routes["/close-after"] = self._close_after
        self.script.routes["/long-status"] = raw_answer(b"HTTP/1.1 200 " + b"x" * (20 * KiB)
                                                        + b"\r\nContent-Length: 2\r\n\r\nok")

        def respond(head: bytes, conn: socket.socket, reader) -> bool:
            target = head.split(b"\r\n", 1)[0].split(b" ")[1]
            if target.startswith(b"/early-413/"):
                self.early.append(head)
                conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                if target.endswith(b"/reset"):
                    set_linger_reset(conn)
                return False  # closed without reading the body
            return self.script(head, conn, reader)

        self.backend = RawBackend(respond)
        self.addCleanup(self.backend.stop)
        self.backend2 = RawBackend(respond)
        self.addCleanup(self.backend2.stop)
        self.addCleanup(self.script.release.set)
        self.balancer = Balancer([self.backend.port, self.backend2.port], *BASE_ARGS,
                                 "--access-log", "-")
        self.addCleanup(self.balancer.stop)
        self.port = self.balancer.port
        self.log_mark = 0

    @staticmethod
    def _close_after(conn: socket.socket, seen: Seen) -> bool:
        """Answer keep-alive (no Connection: close), then close after ?d= seconds."""
        delay = float(seen.path.partition("?d=")[2] or 0)
        body = b"closing"
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        if delay:
            time.sleep(delay)
        return False

    def new_log(self) -> str:
        return self.balancer.log_text()[self.log_mark:]

    def wait_access_line(self, fragment: str, timeout: float = 5.0) -> None:
        wait_for(lambda: fragment in self.new_log(), timeout,
                 message=f"access log line with {fragment!r}")

    def assert_no_backend_down(self, context: str) -> None:
        """No "is DOWN" since setUp; a marker's access line bounds the wait for the log."""
        marker = f"/__logsync/{time.monotonic_ns()}"
        http_exchange(self.port, get(marker, "Connection: close"))  # any status: it is logged
        self.wait_access_line(f'"GET {marker}"')
        warnings = [line for line in self.new_log().splitlines() if " WARNING " in line or " ERROR " in line]
        self.assertEqual([line for line in warnings if "is DOWN" in line], [],
                         f"{context}: a backend was taken DOWN:\n" + "\n".join(warnings[-10:]))

    def assert_both_backends_serve(self, context: str) -> None:
        marks = [backend_mark(self.backend), backend_mark(self.backend2)]
        for index in range(4):
            response = http_exchange(self.port, get(f"/both/{time.monotonic_ns()}/{index}",
                                                    "Connection: close"))
            self.assertEqual(response.status, 200, f"{context}: {response.raw_head!r}")
        for backend, mark in zip((self.backend, self.backend2), marks):
            self.assertTrue(heads_since(backend, mark),
                            f"{context}: backend {backend.port} no longer gets requests")


class UploadFailuresTest(TwoBackendCase):
    """Uploads that end badly on the client's or the backend's side (2, 4, 13)."""

    # --- 2. Expect: 100-continue, client reset ----------------------------------------

    def test_02_expect_continue_client_reset_takes_no_backend_down(self) -> None:
        for index in range(6):
            path = f"/expect-rst/{index}"
            sock = connect(self.port)
            self.addCleanup(sock.close)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n"
                         f"Expect: 100-continue\r\n\r\n".encode())
            if index % 2:
                # variant: some of the body, then the reset
                sock.sendall(b"x" * 10)
            set_linger_reset(sock)
            sock.close()
            # The balancer is done with it once the attempt is access-logged.
            self.wait_access_line(f'"POST {path}"')
        self.assert_both_backends_serve("after client resets")
        self.assert_no_backend_down("Expect: 100-continue + client reset")

    # --- 4. early answer to an upload ------------------------------------------------------

    def test_04_early_413_from_backend_is_relayed_not_502(self) -> None:
        """The backend answers 413 after the head and closes with the body unread (a reset).

        4 MiB cannot fit the socket buffers: the balancer is still streaming the
        body when the reset comes (under strace: its ``sendto`` to the backend
        fails with ECONNRESET, then its ``recvfrom`` still returns the 413).
        """
        size = 4 * MiB
        body = b"x" * size
        for mode in ("close", "reset"):
            with self.subTest(mode):
                path = f"/early-413/{len(self.early)}/{mode}"
                sock = connect(self.port, timeout=10)
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n"
                             .encode())
                failures: list[BaseException] = []

                def pump() -> None:
                    try:
                        sock.sendall(body)
                    except OSError as error:  # the balancer stops reading and closes
                        failures.append(error)
                sender = threading.Thread(target=pump, daemon=True)
                sender.start()

                def cleanup(sock=sock, sender=sender) -> None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # frees a blocked sendall
                    except OSError:
                        pass
                    sender.join(5)
                    sock.close()
                self.addCleanup(cleanup)
                raw, closed = collect_until_close(sock, 10)
                responses = parse_responses(raw)
                self.assertEqual([r.status for r in responses], [413], raw[:500])
                self.assertTrue(closed, "the connection must close: the rest of the body is unread")
                self.assertIn("close", (responses[0].header("Connection") or "").lower())
                self.assertTrue(any(path.encode() in head for head in self.early),
                                "the upload never reached the backend")
        self.assert_both_backends_serve("after early 413s")
        self.assert_no_backend_down("early 413")

    # --- 13. long status line: not retried -----------------------------------------------

    def test_13_status_line_over_16k_is_502_without_retry(self) -> None:
        marks = [backend_mark(self.backend), backend_mark(self.backend2)]
        started = time.monotonic()
        response = http_exchange(self.port, get("/long-status", "Connection: close"))
        self.assertEqual(response.status, 502, response.raw_head)
        self.assertLess(time.monotonic() - started, 3)
        heads = [head for backend, mark in zip((self.backend, self.backend2), marks)
                 for head in heads_since(backend, mark) if b" /long-status " in head]
        self.assertEqual(len(heads), 1, "the request was retried on another backend")
        self.assert_both_backends_serve("after a long status line")


class DeadPooledConnectionTest(TwoBackendCase):
    """12. Own balancer: if a backend is taken DOWN here, no other test suffers for it."""

    def test_12_dead_pooled_connection_on_post_takes_no_backend_down(self) -> None:
        """Backends close idle keep-alive connections 30 ms after answering, unannounced.

        POSTs follow after idle gaps around those 30 ms, so some are sent on a
        pooled connection just as the backend closes it (with the POST unread:
        a reset).  Such a POST may get a 502 (it is not retried), but a dead
        idle connection says nothing about the backend's health.
        """
        bodies = {
            "content-length": lambda path: post(path, b"payload"),
            "chunked": lambda path: get(path, "Transfer-Encoding: chunked", method="POST")
                                     + http11.chunk(b"payload") + b"0\r\n\r\n",
        }
        for kind, make in bodies.items():
            with self.subTest(kind):
                self.log_mark = len(self.balancer.log_text())
                statuses = []
                client = None
                for gap in (0.0, 0.01, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05):
                    for step in range(4):  # two per backend (round robin), the gap in between
                        if step == 2:
                            time.sleep(gap)  # the idle gap is the point
                        if client is None:
                            client = Client(self, self.port)
                        response = client.request(make("/close-after?d=0.03"))
                        statuses.append(response.status)
                        if (response.header("Connection") or "").lower() == "close":
                            client = None
                self.assert_no_backend_down(f"{kind}: dead pooled connections (statuses {statuses})")
                self.assertTrue(set(statuses) <= {200, 502}, statuses)
                self.assertIn(200, statuses)
                self.assert_both_backends_serve(f"{kind}: after dead pooled connections")


# =====================================================================================
# 5. in_flight never goes negative
# =====================================================================================

class InFlightTest(unittest.TestCase):
    def setUp(self) -> None:
        def truncated(head: bytes, conn: socket.socket, reader) -> bool:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nabc")
            return False

        self.broken = RawBackend(truncated)
        self.addCleanup(self.broken.stop)
        self.healthy = RawBackend()
        self.addCleanup(self.healthy.stop)
        self.balancer = Balancer([self.broken.port, self.healthy.port], *BASE_ARGS,
                                 "--admin-port", "0", "--max-fails", "0")
        self.addCleanup(self.balancer.stop)
        self.admin_port = wait_admin_port(self.balancer)

    def status(self) -> dict:
        response = http_exchange(self.admin_port, b"GET /status HTTP/1.1\r\nHost: admin\r\n"
                                                  b"Connection: close\r\n\r\n")
        self.assertEqual(response.status, 200, response.raw_head)
        return json.loads(response.body)

    def test_05_in_flight_is_zero_after_retried_truncated_bodies(self) -> None:
        for index in range(6):
            response = http_exchange(self.balancer.port, get(f"/r/{index}", "Connection: close"))
            self.assertEqual(response.status, 200, response.raw_head + response.body)
            self.assertEqual(response.body, b'{"ok": true}')
        self.assertGreaterEqual(len(self.broken.heads), 2, "the truncating backend was never tried")
        seen: list[list[int]] = []

        def settled() -> bool:
            values = [backend["in_flight"] for backend in self.status()["backends"]]
            seen.append(values)
            return values == [0, 0]
        try:
            wait_for(settled, 5, interval=0.05, message="in_flight 0 for both backends")
        finally:
            negative = [values for values in seen if min(values) < 0]
            self.assertEqual(negative, [], f"in_flight went negative: {seen[-5:]}")
        self.assertNotIn("Traceback", self.balancer.log_text())


if __name__ == "__main__":
    unittest.main()
