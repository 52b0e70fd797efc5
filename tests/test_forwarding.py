"""Tests for forwarding: the proxy's decisions about a request/response pair.

Table-driven and without sockets: request heads are built from text, run
through ``check_request_head``, ``upstream_request_head`` and
``response_plan``, and the outcome compared with the expected one.  The
reclaim tests at the end run an in-process ``LoadBalancerServer``.
"""

from __future__ import annotations

import io
import socket
import sys
import threading
import unittest
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import http11  # noqa: E402
from forwarding import (BUFFERED, NO_BODY, STREAMED, TRACE_ALLOW, Request, check_request_head,  # noqa: E402
                        error_closes_connection, request_id_for, response_plan,
                        switching_protocols_head, upstream_request_head)
from http11 import Fields, ProtocolError  # noqa: E402
from message_reader import Limits, ResponseHead, read_response_head  # noqa: E402
import settings  # noqa: E402
from settings import Listener  # noqa: E402
from backend_urls import parse_backend  # noqa: E402
from cluster import ServerCluster  # noqa: E402
from loggers import AccessLog  # noqa: E402
from proxy import IDLE, LoadBalancerServer, ProxyHandler  # noqa: E402
from tests.support import RawBackend, connect, read_response, read_until_close, wait_for  # noqa: E402

MAX_BODY = 1000


def fields_of(lines: list[str]) -> Fields:
    return Fields(tuple(line.split(": ", 1)) for line in lines)  # type: ignore[misc]


def request(line: str, *lines: str, max_body: int = MAX_BODY) -> Request:
    """``check_request_head`` of a request line and field lines given as text."""
    request_line = http11.parse_request_line(line.encode("latin-1") + b"\r\n", 8192)
    return check_request_head(request_line, fields_of(list(lines)), max_body)


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(start line, fields) of a serialized head, checking its syntax on the way."""
    text = head.decode("latin-1")
    assert text.endswith("\r\n\r\n"), text
    start, *lines = text[:-4].split("\r\n")
    return start, [tuple(line.split(": ", 1)) for line in lines]  # type: ignore[misc]


def names(fields: list[tuple[str, str]]) -> list[str]:
    return [name.lower() for name, _ in fields]


def values(fields: list[tuple[str, str]], lname: str) -> list[str]:
    return [value for name, value in fields if name.lower() == lname]


class CheckRequestHeadTest(unittest.TestCase):
    """Which request heads are accepted, and what the accepted ones mean."""

    REJECTED: list[tuple[str, list[str], int]] = [
        # (request line, field lines, status the client gets)
        ("GET / HTTP/1.1", [], 400),  # RFC 9112 3.2: Host required in 1.1
        ("GET / HTTP/1.1", ["Host: a", "Host: b"], 400),
        ("GET / HTTP/1.0", ["Host: a", "Host: a"], 400),  # more than one: 400 in any version
        ("GET / HTTP/1.1", ["Host: a b"], 400),
        ("GET / HTTP/1.1", ["Host: a@b"], 400),
        ("CONNECT a.example:443 HTTP/1.1", ["Host: a.example:443"], 405),
        ("GET http://user@a.example/ HTTP/1.1", ["Host: a.example"], 400),
        ("GET http://:80/ HTTP/1.1", ["Host: a.example"], 400),
        ("GET http://a.example:99999/ HTTP/1.1", ["Host: a.example"], 400),
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 1001"], 413),
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 5", "Transfer-Encoding: chunked"], 400),
        ("POST / HTTP/1.1", ["Host: a", "Transfer-Encoding: gzip, chunked"], 501),
        ("POST / HTTP/1.1", ["Host: a", "Transfer-Encoding: gzip"], 400),
        ("POST / HTTP/1.0", ["Host: a", "Transfer-Encoding: chunked"], 400),
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 1, 2"], 400),
        ("GET / HTTP/1.1", ["Host: a", "Expect: 200-ok"], 417),
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 3", "Expect: something"], 417),
    ]

    def test_rejected_heads_get_their_status(self) -> None:
        for line, lines, status in self.REJECTED:
            with self.subTest(line=line, fields=lines):
                with self.assertRaises(ProtocolError) as caught:
                    request(line, *lines)
                self.assertEqual(caught.exception.status, status)

    ACCEPTED: list[tuple[str, list[str], dict[str, Any]]] = [
        ("GET /a?b HTTP/1.1", ["Host: shop.example"],
         dict(method="GET", target="/a?b", host="shop.example", keep_alive=True,
              expect_continue=False, has_length_field=False)),
        ("GET / HTTP/1.1", ["Host: a", "Connection: close"], dict(keep_alive=False)),
        ("GET / HTTP/1.1", ["Host: a", "Connection: Keep-Alive, Close"], dict(keep_alive=False)),
        ("GET / HTTP/1.0", [], dict(host=None, keep_alive=False, version=(1, 0))),
        ("GET / HTTP/1.0", ["Connection: keep-alive"], dict(host=None, keep_alive=True)),
        ("GET / HTTP/1.1", ["Host: "], dict(host="")),  # empty Host is valid (RFC 9112 3.2)
        ("GET / HTTP/1.1", ["Host: [::1]:8080"], dict(host="[::1]:8080")),
        # RFC 9112 3.2.2: the absolute-form authority replaces Host.
        ("GET http://b.example:8080/p?q=1 HTTP/1.1", ["Host: other"],
         dict(host="b.example:8080", target="/p?q=1",
              shown_target="http://b.example:8080/p?q=1")),
        ("GET http://b.example HTTP/1.1", ["Host: other"], dict(host="b.example", target="/")),
        ("OPTIONS * HTTP/1.1", ["Host: a"], dict(target="*")),
        ("TRACE / HTTP/1.1", ["Host: a"], dict(method="TRACE")),  # answered by the handler
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 1000"],
         dict(framing=http11.BodyFraming("length", 1000), has_length_field=True)),
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 0"],
         dict(framing=http11.NO_BODY, has_length_field=True)),
        ("POST / HTTP/1.1", ["Host: a", "Transfer-Encoding: chunked"],
         dict(framing=http11.BodyFraming("chunked"))),
        # RFC 9110 10.1.1: 100-continue only matters when there is a body...
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 5", "Expect: 100-Continue"],
         dict(expect_continue=True)),
        ("GET / HTTP/1.1", ["Host: a", "Expect: 100-continue"], dict(expect_continue=False)),
        ("POST / HTTP/1.1", ["Host: a", "Transfer-Encoding: chunked", "Expect: 100-continue"],
         dict(expect_continue=True)),
        # ... and Expect is ignored in a 1.0 request.
        ("POST / HTTP/1.0", ["Content-Length: 5", "Expect: anything"], dict(expect_continue=False)),
    ]

    def test_accepted_heads(self) -> None:
        for line, lines, expected in self.ACCEPTED:
            with self.subTest(line=line, fields=lines):
                result = request(line, *lines)
                for attribute, value in expected.items():
                    self.assertEqual(getattr(result, attribute), value, attribute)

    def test_absolute_form_replaces_every_host_field(self) -> None:
        result = request("GET http://b.example/ HTTP/1.1", "Host: other", "X-A: 1")
        self.assertEqual(result.headers.index["host"], ["b.example"])
        self.assertEqual(result.headers.items, [("X-A", "1"), ("Host", "b.example")])

    def test_error_statuses_that_close_the_connection(self) -> None:
        for status, closes in ((400, True), (408, True), (413, True), (414, True), (417, True),
                               (431, True), (501, True), (505, True), (405, False),
                               (502, False), (503, False), (504, False)):
            with self.subTest(status=status):
                self.assertIs(error_closes_connection(status), closes)
        self.assertNotIn("TRACE", TRACE_ALLOW)
        self.assertNotIn("CONNECT", TRACE_ALLOW)


def legacy_upstream_head(request: Request, client_ip: str, request_id: str) -> bytes:
    """The upstream head as ProxyHandler.upstream_head built it before forwarding.py."""
    drop: tuple[str, ...] = ("content-length", "expect")
    if http11.get_field(request.headers, "x-request-id") != request_id:
        drop += ("x-request-id",)
    headers = http11.end_to_end(request.headers, drop)
    if request.host is None or not any(n.lower() == "host" for n, _ in headers):
        headers = [(n, v) for n, v in headers if n.lower() != "host"]
        headers.insert(0, ("Host", request.host or ""))
    if "x-request-id" in drop:
        headers.append(("X-Request-ID", request_id))
    headers = http11.append_forwarded(headers, client_ip, "http", request.host)
    if request.framing.kind == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    elif request.framing.kind == "length" or request.has_length_field:
        headers.append(("Content-Length", str(request.framing.length)))
    return http11.serialize_head(f"{request.method} {request.target} HTTP/1.1", headers)


class UpstreamHeadTest(unittest.TestCase):
    """The request head as a backend receives it."""

    def upstream(self, line: str, *lines: str, client_ip: str = "9.9.9.9",
                 request_id: str | None = None) -> tuple[str, list[tuple[str, str]]]:
        req = request(line, *lines)
        rid = request_id if request_id is not None else request_id_for(req.headers)
        head = upstream_request_head(req, client_ip, "http", rid)
        # Same bytes as the implementation this one replaced.
        self.assertEqual(head, legacy_upstream_head(req, client_ip, rid))
        return parse_head(head)

    def test_request_id_for(self) -> None:
        kept = ["abc", "A-b_c.d:e", "x" * 128]
        replaced = [None, "", "x" * 129, "a b", "a/b", "é", "<script>"]
        for value in kept + replaced:
            with self.subTest(value=value):
                fields = Fields([("X-Request-ID", value)] if value is not None else [])
                result = request_id_for(fields)
                if value in kept:
                    self.assertEqual(result, value)
                else:
                    self.assertRegex(result, r"\A[0-9a-f]{16}\Z")
        self.assertNotEqual(request_id_for(Fields()), request_id_for(Fields()))

    CASES: list[tuple[str, list[str], dict[str, Any]]] = [
        # (request line, client fields, expected: field -> values, or "absent" list)
        ("GET /p HTTP/1.1", ["Host: shop.example", "Accept: */*"],
         {"host": ["shop.example"], "accept": ["*/*"], "x-forwarded-for": ["9.9.9.9"],
          "x-forwarded-proto": ["http"], "x-forwarded-host": ["shop.example"],
          "absent": ["content-length", "transfer-encoding", "connection"]}),
        # X-Forwarded-For chains (several fields joined in order); the others are replaced.
        ("GET / HTTP/1.1", ["Host: a", "X-Forwarded-For: 1.1.1.1, 2.2.2.2",
                            "X-Forwarded-For: 3.3.3.3", "X-Forwarded-Proto: https",
                            "X-Forwarded-Host: evil"],
         {"x-forwarded-for": ["1.1.1.1, 2.2.2.2, 3.3.3.3, 9.9.9.9"],
          "x-forwarded-proto": ["http"], "x-forwarded-host": ["a"]}),
        # Hop-by-hop fields and the ones named in Connection go (RFC 9110 7.6.1).
        ("GET / HTTP/1.1", ["Host: a", "Connection: keep-alive, X-Secret", "Keep-Alive: 5",
                            "X-Secret: s", "TE: trailers", "Upgrade: h2c", "Proxy-Connection: x",
                            "Trailer: X", "X-Keep: k"],
         {"x-keep": ["k"], "absent": ["connection", "keep-alive", "x-secret", "te", "upgrade",
                                      "proxy-connection", "trailer"]}),
        # Connection: host cannot strip Host (RFC 9112 3.2).
        ("GET / HTTP/1.1", ["Host: a", "Connection: host"], {"host": ["a"]}),
        # Connection naming X-Forwarded-For: the client's chain is dropped.
        ("GET / HTTP/1.1", ["Host: a", "X-Forwarded-For: 1.1.1.1", "Connection: x-forwarded-for"],
         {"x-forwarded-for": ["9.9.9.9"]}),
        # A 1.0 request without Host gets an empty one, and no X-Forwarded-Host.
        ("GET / HTTP/1.0", [], {"host": [""], "absent": ["x-forwarded-host"]}),
        ("GET http://b.example:81/x HTTP/1.1", ["Host: other"],
         {"host": ["b.example:81"], "x-forwarded-host": ["b.example:81"]}),
        # The framing field matches the body as sent; Expect is cclb's business.
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 5", "Expect: 100-continue"],
         {"content-length": ["5"], "absent": ["expect", "transfer-encoding"]}),
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 0"], {"content-length": ["0"]}),
        ("POST / HTTP/1.1", ["Host: a", "Content-Length: 5, 5"], {"content-length": ["5"]}),
        ("POST / HTTP/1.1", ["Host: a", "Transfer-Encoding: chunked"],
         {"transfer-encoding": ["chunked"], "absent": ["content-length"]}),
    ]

    def test_fields_sent_upstream(self) -> None:
        for line, lines, expected in self.CASES:
            with self.subTest(line=line, fields=lines):
                start, fields = self.upstream(line, *lines)
                self.assertTrue(start.endswith(" HTTP/1.1"), start)
                for lname, expected_values in expected.items():
                    if lname == "absent":
                        for absent in expected_values:
                            self.assertNotIn(absent, names(fields))
                    else:
                        self.assertEqual(values(fields, lname), expected_values, lname)
                self.assertEqual(len(values(fields, "host")), 1)
                self.assertEqual(len(values(fields, "x-request-id")), 1)

    def test_start_line_is_origin_form_in_http_1_1(self) -> None:
        for line, expected in (("GET /a?b HTTP/1.0", "GET /a?b HTTP/1.1"),
                               ("GET http://h/x?y HTTP/1.1", "GET /x?y HTTP/1.1"),
                               ("OPTIONS * HTTP/1.1", "OPTIONS * HTTP/1.1")):
            with self.subTest(line=line):
                self.assertEqual(self.upstream(line, "Host: h")[0], expected)

    def test_valid_client_request_id_is_kept_in_place(self) -> None:
        _, fields = self.upstream("GET / HTTP/1.1", "Host: a", "X-Request-ID: abc-1", "X-B: 2")
        self.assertEqual(names(fields)[:3], ["host", "x-request-id", "x-b"])
        self.assertEqual(values(fields, "x-request-id"), ["abc-1"])

    def test_invalid_client_request_id_is_replaced(self) -> None:
        for bad in ("a b", "", "x" * 200):
            with self.subTest(bad=bad):
                _, fields = self.upstream("GET / HTTP/1.1", "Host: a", f"X-Request-ID: {bad}")
                (value,) = values(fields, "x-request-id")
                self.assertRegex(value, r"\A[0-9a-f]{16}\Z")

    def test_given_request_id_is_sent(self) -> None:
        _, fields = self.upstream("GET / HTTP/1.1", "Host: a", request_id="r-42")
        self.assertEqual(values(fields, "x-request-id"), ["r-42"])


def response(status: int, *lines: str, method: str = "GET", version: tuple[int, int] = (1, 1),
             reason: str = "OK") -> ResponseHead:
    fields = fields_of(list(lines))
    framing = http11.response_framing(status, method, fields)
    return ResponseHead(version, status, reason, fields, framing,
                        http11.response_reusable(version, status, fields, framing))


GZIP = 6
MIN_GZIP = 1000
BUFFER = 256 * 1024


class ResponsePlanTest(unittest.TestCase):
    """How a backend's response goes out: fields, body mode, gzip, framing, close."""

    # (name, request line, request fields, response, close_connection, expected)
    # expected: plan attributes, plus "fields": field -> values in the head (with
    # Content-Length 2000 for a buffered body) and "absent": fields not in it.
    CASES: list[tuple[str, str, list[str], ResponseHead, bool, dict[str, Any]]] = [
        ("small 1.1", "GET / HTTP/1.1", [],
         response(200, "Content-Type: text/html", "Content-Length: 2000"), False,
         dict(body=BUFFERED, gzip=False, chunked=False, close=False,
              absent=["connection", "content-encoding"])),
        ("small gzip", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(200, "Content-Type: text/html", "Content-Length: 2000", 'ETag: "x"'), False,
         dict(body=BUFFERED, gzip=True, fields={"content-encoding": ["gzip"],
                                                "vary": ["Accept-Encoding"], "etag": ['W/"x"']})),
        ("below gzip min size", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(200, "Content-Type: text/html", "Content-Length: 999"), False,
         dict(body=BUFFERED, gzip=False)),
        ("gzip q=0", "GET / HTTP/1.1", ["Accept-Encoding: gzip;q=0"],
         response(200, "Content-Type: text/html", "Content-Length: 2000"), False,
         dict(gzip=False)),
        ("already encoded", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(200, "Content-Type: text/html", "Content-Encoding: br", "Content-Length: 2000"),
         False, dict(gzip=False, fields={"content-encoding": ["br"]})),
        ("no-transform", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(200, "Content-Type: text/html", "Cache-Control: no-transform",
                  "Content-Length: 2000"), False, dict(gzip=False)),
        ("not compressible", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(200, "Content-Type: image/png", "Content-Length: 2000"), False,
         dict(gzip=False)),
        ("206", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(206, "Content-Type: text/html", "Content-Range: bytes 0-1999/5000",
                  "Content-Length: 2000"), False, dict(gzip=False)),
        # A Content-Encoding the backend names in Connection is not forwarded: not encoded.
        ("encoding named in Connection", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(200, "Content-Type: text/html", "Content-Encoding: br",
                  "Connection: content-encoding", "Content-Length: 2000"), False,
         dict(gzip=True, fields={"content-encoding": ["gzip"]})),
        # RFC 9110 9.3.2: HEAD gets the fields the GET would get.
        ("HEAD gzip", "HEAD / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(200, "Content-Type: text/html", "Content-Length: 2000", method="HEAD"), False,
         dict(body=NO_BODY, gzip=False, fields={"content-encoding": ["gzip"],
                                                "vary": ["Accept-Encoding"]},
              absent=["content-length"])),
        ("HEAD plain", "HEAD / HTTP/1.1", [],
         response(200, "Content-Type: text/html", "Content-Length: 2000", method="HEAD"), False,
         dict(body=NO_BODY, fields={"content-length": ["2000"]}, absent=["content-encoding"])),
        # RFC 9110 15.4.5: a 304 has the Vary/ETag the 200 would have, no encoding.
        ("304 of a gzipped 200", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(304, "Content-Type: text/html", "Content-Length: 2000", 'ETag: "e"'), False,
         dict(body=NO_BODY, fields={"vary": ["Accept-Encoding"], "etag": ['W/"e"']},
              absent=["content-encoding", "content-length"])),
        ("304 plain", "GET / HTTP/1.1", [],
         response(304, 'ETag: "e"', "Content-Length: 2000"), False,
         dict(body=NO_BODY, fields={"etag": ['"e"'], "content-length": ["2000"]})),
        ("204", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(204, "Content-Type: text/html", "Content-Length: 0"), False,
         dict(body=NO_BODY, gzip=False, absent=["content-length", "content-encoding"])),
        # Streamed bodies: chunked for 1.1 unless the length is known and kept.
        ("large 1.1", "GET / HTTP/1.1", [],
         response(200, "Content-Type: text/html", "Content-Length: 300000"), False,
         dict(body=STREAMED, chunked=False, close=False, fields={"content-length": ["300000"]},
              absent=["transfer-encoding"])),
        ("large gzip 1.1", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(200, "Content-Type: text/html", "Content-Length: 300000"), False,
         dict(body=STREAMED, gzip=True, chunked=True, close=False,
              fields={"transfer-encoding": ["chunked"], "content-encoding": ["gzip"]},
              absent=["content-length"])),
        ("chunked 1.1", "GET / HTTP/1.1", [],
         response(200, "Content-Type: image/png", "Transfer-Encoding: chunked"), False,
         dict(body=STREAMED, chunked=True, close=False, fields={"transfer-encoding": ["chunked"]})),
        ("until close 1.1", "GET / HTTP/1.1", [],
         response(200, "Content-Type: image/png"), False,
         dict(body=STREAMED, chunked=True, close=False)),
        ("event stream", "GET / HTTP/1.1", ["Accept-Encoding: gzip"],
         response(200, "Content-Type: text/event-stream", "Transfer-Encoding: chunked"), False,
         dict(body=STREAMED, gzip=False, chunked=True)),
        # 1.0 clients: no chunked (RFC 9112 6.1); without a length the close ends the body.
        ("1.0 keep-alive small", "GET / HTTP/1.0", ["Connection: keep-alive"],
         response(200, "Content-Type: image/png", "Content-Length: 2000"), False,
         dict(body=BUFFERED, close=False, fields={"connection": ["keep-alive"]})),
        ("1.0 small gzip", "GET / HTTP/1.0", ["Connection: keep-alive", "Accept-Encoding: gzip"],
         response(200, "Content-Type: text/html", "Content-Length: 2000"), False,
         dict(body=BUFFERED, gzip=True, close=False, fields={"connection": ["keep-alive"]})),
        ("1.0 large", "GET / HTTP/1.0", ["Connection: keep-alive"],
         response(200, "Content-Type: image/png", "Content-Length: 300000"), False,
         dict(body=STREAMED, chunked=False, close=False,
              fields={"content-length": ["300000"], "connection": ["keep-alive"]})),
        ("1.0 large gzip", "GET / HTTP/1.0", ["Connection: keep-alive", "Accept-Encoding: gzip"],
         response(200, "Content-Type: text/html", "Content-Length: 300000"), False,
         dict(body=STREAMED, gzip=True, chunked=False, close=True,
              fields={"connection": ["close"]}, absent=["content-length", "transfer-encoding"])),
        ("1.0 chunked", "GET / HTTP/1.0", ["Connection: keep-alive"],
         response(200, "Content-Type: image/png", "Transfer-Encoding: chunked"), False,
         dict(body=STREAMED, chunked=False, close=True, fields={"connection": ["close"]},
              absent=["content-length", "transfer-encoding"])),
        ("1.0 HEAD", "HEAD / HTTP/1.0", [],
         response(200, "Content-Length: 5", method="HEAD"), True,
         dict(body=NO_BODY, close=True, fields={"connection": ["close"],
                                                "content-length": ["5"]})),
        # Connection: close towards the client when it asked (or cclb drains).
        ("client close", "GET / HTTP/1.1", ["Connection: close"],
         response(200, "Content-Length: 2000"), True,
         dict(close=True, fields={"connection": ["close"]})),
        # The backend's own connection management never reaches the client.
        ("backend hop-by-hop", "GET / HTTP/1.1", [],
         response(200, "Connection: close, X-Internal", "Keep-Alive: timeout=5",
                  "X-Internal: secret", "X-Request-ID: backend-id", "X-Keep: k",
                  "Transfer-Encoding: chunked"), False,
         dict(close=False, fields={"x-keep": ["k"], "x-request-id": ["rid-1"],
                                   "transfer-encoding": ["chunked"]},
              absent=["connection", "keep-alive", "x-internal"])),
    ]

    def test_plans(self) -> None:
        for name, line, lines, resp, close, expected in self.CASES:
            with self.subTest(name):
                req = request(line, "Host: a", *lines)
                plan = response_plan(req, resp, "rid-1", GZIP, MIN_GZIP, close, BUFFER)
                expected = dict(expected)
                expected_fields = expected.pop("fields", {})
                absent = expected.pop("absent", [])
                for attribute, value in expected.items():
                    self.assertEqual(getattr(plan, attribute), value, attribute)
                start, fields = parse_head(plan.head(2000 if plan.body == BUFFERED else None))
                self.assertEqual(start, f"HTTP/1.1 {resp.status} OK")
                for lname, expected_values in expected_fields.items():
                    self.assertEqual(values(fields, lname), expected_values, lname)
                for lname in absent:
                    self.assertNotIn(lname, names(fields))
                self.assertEqual(values(fields, "x-request-id"), ["rid-1"])
                # One framing field at most, and exactly one for a buffered body.
                framing = [n for n in names(fields) if n in ("content-length", "transfer-encoding")]
                self.assertLessEqual(len(framing), 1, fields)
                if plan.body == BUFFERED:
                    self.assertEqual(values(fields, "content-length"), ["2000"])
                if plan.body == STREAMED and not plan.chunked and "content-length" not in framing:
                    self.assertTrue(plan.close, "a body without framing must end with the close")

    def test_gzip_level_zero_never_gzips(self) -> None:
        req = request("GET / HTTP/1.1", "Host: a", "Accept-Encoding: gzip")
        for resp in (response(200, "Content-Type: text/html", "Content-Length: 2000"),
                     response(200, "Content-Type: text/html", "Content-Length: 2000", method="HEAD")):
            with self.subTest(method=req.method, framing=resp.framing.kind):
                plan = response_plan(req, resp, "r", 0, MIN_GZIP, False, BUFFER)
                self.assertFalse(plan.gzip)
                self.assertNotIn(b"gzip", plan.head(10))

    def test_identity_head_is_the_ungzipped_response(self) -> None:
        """A truncated buffered body goes out as received, under its declared length."""
        req = request("GET / HTTP/1.1", "Host: a", "Accept-Encoding: gzip")
        resp = response(200, "Content-Type: text/html", 'ETag: "x"', "Content-Length: 2000")
        plan = response_plan(req, resp, "r", GZIP, MIN_GZIP, False, BUFFER)
        self.assertTrue(plan.gzip)
        _, fields = parse_head(plan.identity_head(2000))
        self.assertEqual(values(fields, "etag"), ['"x"'])
        self.assertNotIn("content-encoding", names(fields))
        self.assertEqual(values(fields, "content-length"), ["2000"])

    def test_plan_does_not_change_the_response_fields(self) -> None:
        req = request("GET / HTTP/1.1", "Host: a", "Accept-Encoding: gzip")
        resp = response(200, "Content-Type: text/html", "Content-Length: 2000", "Connection: x")
        before = list(resp.headers.items)
        response_plan(req, resp, "r", GZIP, MIN_GZIP, False, BUFFER)
        self.assertEqual(resp.headers.items, before)


class ResponseReusableTest(unittest.TestCase):
    """May the backend connection carry another request after this response?"""

    CASES: list[tuple[str, tuple[int, int], int, str, list[str], bool]] = [
        ("1.1 length", (1, 1), 200, "GET", ["Content-Length: 5"], True),
        ("1.1 chunked", (1, 1), 200, "GET", ["Transfer-Encoding: chunked"], True),
        ("1.1 close", (1, 1), 200, "GET", ["Content-Length: 5", "Connection: close"], False),
        ("1.1 until close", (1, 1), 200, "GET", [], False),
        ("1.0 length", (1, 0), 200, "GET", ["Content-Length: 5"], False),
        ("1.0 keep-alive", (1, 0), 200, "GET", ["Content-Length: 5", "Connection: keep-alive"], True),
        # RFC 9112 6.3 (3) and 6.1: suspect framing poisons the connection.
        ("CL and TE", (1, 1), 200, "GET", ["Content-Length: 5", "Transfer-Encoding: chunked"], False),
        ("1.0 with TE", (1, 0), 200, "GET",
         ["Transfer-Encoding: chunked", "Connection: keep-alive"], False),
        ("204", (1, 1), 204, "GET", [], True),
        ("204 with CL 0", (1, 1), 204, "GET", ["Content-Length: 0"], True),
        ("204 declaring a body", (1, 1), 204, "GET", ["Content-Length: 7"], False),
        ("304 with TE", (1, 1), 304, "GET", ["Transfer-Encoding: chunked"], False),
        ("HEAD declaring a body", (1, 1), 200, "HEAD", ["Content-Length: 7"], False),
        ("HEAD without length", (1, 1), 200, "HEAD", [], True),
    ]

    def test_cases(self) -> None:
        for name, version, status, method, lines, expected in self.CASES:
            with self.subTest(name):
                fields = fields_of(lines)
                framing = http11.response_framing(status, method, fields)
                self.assertIs(http11.response_reusable(version, status, fields, framing), expected)


# --- reclaiming idle connections at --max-connections -----------------------------


class Gate:
    """Holds one handler between "the next request is readable" and claiming it."""

    def __init__(self) -> None:
        self.armed = threading.Event()  # hold the next handler that gets there
        self.reached = threading.Event()  # a handler is being held
        self.proceed = threading.Event()  # let it go on
        self.lock = threading.Lock()
        self.calls = 0  # guarded by lock

    def pass_through(self) -> None:
        with self.lock:
            self.calls += 1
        if self.armed.is_set():
            self.armed.clear()
            self.reached.set()
            self.proceed.wait(10)


class GatedHandler(ProxyHandler):
    gate: Gate

    def before_claim(self) -> None:
        self.gate.pass_through()


def get(path: str, *lines: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: test", *lines, "", ""]).encode()


class ReclaimTest(unittest.TestCase):
    """At the connection limit, only connections that are really idle are closed.

    An in-process ``LoadBalancerServer`` with ``--max-connections 1``; a gate in
    the handler forces the interleaving: the connection was idle, the client's
    next request has arrived, the handler has not claimed it yet, and then a
    second client connects (or the server drains).
    """

    def setUp(self) -> None:
        backend = RawBackend()
        self.addCleanup(backend.stop)
        config = settings.load(["-b", f"http://127.0.0.1:{backend.port}", "--max-connections", "1",
                                "--keepalive-timeout", "30", "--access-log", "off"])
        cluster = ServerCluster([parse_backend(f"http://127.0.0.1:{backend.port}")])
        self.addCleanup(lambda: [b.pool.close_all() for b in cluster.backends])
        self.server = LoadBalancerServer(Listener("127.0.0.1", 0), config, cluster, AccessLog("off"))
        self.gate = Gate()
        self.server.RequestHandlerClass = type("Handler", (GatedHandler,), {"gate": self.gate})
        self.port = self.server.server_address[1]
        thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.addCleanup(self.gate.proceed.set)  # never leave a handler held

    def client(self) -> tuple[socket.socket, Any]:
        sock = connect(self.port)
        self.addCleanup(sock.close)
        reader = sock.makefile("rb")
        self.addCleanup(reader.close)
        return sock, reader

    def wait_idle(self) -> None:
        """Until the (only) connection's handler waits for its next request, IDLE."""
        def idle() -> bool:
            with self.server.lock:
                return any(handler is not None and handler.state == IDLE
                           for handler in self.server.connections.values())
        wait_for(idle, 5, message="the connection to go idle")

    def idle_client(self) -> tuple[socket.socket, Any]:
        """A keep-alive connection that has had one answer and now waits."""
        sock, reader = self.client()
        sock.sendall(get("/first"))
        self.assertEqual(read_response(reader).status, 200)
        self.wait_idle()
        return sock, reader

    def test_a_request_that_arrived_is_not_cut_off_by_a_new_client(self) -> None:
        a, a_reader = self.idle_client()
        self.gate.armed.set()
        a.sendall(get("/second"))
        self.assertTrue(self.gate.reached.wait(10), "A's handler never saw its next request")
        # A's request has arrived but is not claimed yet; now a second client comes.
        b, _ = self.client()
        b.sendall(get("/new", "Connection: close"))
        b_answer = read_until_close(b)  # the accept thread has decided once b has an answer
        self.gate.proceed.set()
        second = read_response(a_reader)  # ConnectionError if A was closed
        self.assertEqual((second.status, second.complete), (200, True))
        # A was not idle, so there was no room: B is turned away, not served.
        self.assertTrue(b_answer.startswith(b"HTTP/1.1 503 "), b_answer[:80])
        a.sendall(get("/third"))  # and A's connection goes on
        self.assertEqual(read_response(a_reader).status, 200)

    def test_an_idle_connection_is_reclaimed_for_a_new_client(self) -> None:
        a, _ = self.idle_client()
        b, b_reader = self.client()
        b.sendall(get("/new", "Connection: close"))
        self.assertEqual(read_response(b_reader).status, 200)
        self.assertEqual(read_until_close(a), b"")  # closed quietly: no error answer

    def test_drain_keeps_a_request_that_arrived(self) -> None:
        a, a_reader = self.idle_client()
        self.gate.armed.set()
        a.sendall(get("/second"))
        self.assertTrue(self.gate.reached.wait(10))
        self.assertFalse(self.server.drain(0), "A's request counts as in flight")
        self.gate.proceed.set()
        second = read_response(a_reader)
        self.assertEqual((second.status, second.complete), (200, True))
        self.assertEqual(second.header("connection"), "close")  # draining
        wait_for(lambda: self.server.drain(0), 5, message="the drain to finish")

    def test_drain_closes_an_idle_connection(self) -> None:
        a, _ = self.idle_client()
        wait_for(lambda: self.server.drain(0), 5, message="the drain to finish")
        self.assertEqual(read_until_close(a), b"")

    def test_pipelined_requests_skip_the_idle_wait(self) -> None:
        """Requests already read into the buffer are served without waiting for more bytes."""
        a, a_reader = self.client()
        self.wait_idle()
        self.gate.armed.set()
        requests = get("/1") + get("/2") + get("/3")
        a.sendall(requests)
        self.assertTrue(self.gate.reached.wait(10))
        with self.server.lock:
            (server_side,) = self.server.connections
        # All three are queued on the server side before the handler reads: its
        # first read takes them all, and the next two are already buffered.

        def queued() -> int:
            try:
                return len(server_side.recv(len(requests) + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except BlockingIOError:
                return 0
        wait_for(lambda: queued() == len(requests), 5, message="the three requests to arrive")
        self.gate.proceed.set()
        for _ in range(3):
            self.assertEqual(read_response(a_reader).status, 200)
        with self.gate.lock:
            self.assertEqual(self.gate.calls, 1)

class UpgradeTest(unittest.TestCase):
    """Upgrade requests (RFC 9110 7.8): what is passed on, and the 101 head sent back."""

    # (request line, client fields, expected Request.upgrade)
    CASES: list[tuple[str, list[str], str | None]] = [
        ("GET /ws HTTP/1.1", ["Host: h", "Connection: Upgrade", "Upgrade: websocket"], "websocket"),
        ("GET /ws HTTP/1.1", ["Host: h", "Connection: keep-alive, Upgrade", "Upgrade: WebSocket"],
         "WebSocket"),
        ("GET /ws HTTP/1.1", ["Host: h", "Connection: upgrade", "Upgrade: foo/2, bar"], "foo/2, bar"),
        # Upgrade not named in Connection: a stray hop-by-hop field, no upgrade.
        ("GET /ws HTTP/1.1", ["Host: h", "Upgrade: websocket"], None),
        # Connection: upgrade without an Upgrade field: nothing to switch to.
        ("GET /ws HTTP/1.1", ["Host: h", "Connection: upgrade"], None),
        # h2c is never passed on (cclb does not speak HTTP/2 to backends).
        ("GET / HTTP/1.1", ["Host: h", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
                            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"], None),
        ("GET / HTTP/1.1", ["Host: h", "Connection: Upgrade", "Upgrade: H2C, websocket"], "websocket"),
        # RFC 9110 7.8: a server MUST ignore Upgrade in an HTTP/1.0 request.
        ("GET /ws HTTP/1.0", ["Host: h", "Connection: Upgrade", "Upgrade: websocket"], None),
        ("GET /ws HTTP/1.1", ["Host: h"], None),
    ]

    def test_check_request_head_decides_the_upgrade(self) -> None:
        for line, lines, expected in self.CASES:
            with self.subTest(line=line, fields=lines):
                self.assertEqual(request(line, *lines).upgrade, expected)

    def test_upstream_head_keeps_connection_upgrade_and_upgrade_only_for_an_upgrade(self) -> None:
        for line, lines, expected in self.CASES:
            with self.subTest(line=line, fields=lines):
                req = request(line, *lines, "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
                _, fields = parse_head(upstream_request_head(req, "1.2.3.4", "http", "rid"))
                self.assertEqual(values(fields, "sec-websocket-key"), ["dGhlIHNhbXBsZSBub25jZQ=="])
                self.assertNotIn("http2-settings", names(fields))
                if expected is None:
                    self.assertNotIn("upgrade", names(fields))
                    self.assertNotIn("connection", names(fields))
                else:
                    self.assertEqual(values(fields, "connection"), ["upgrade"])
                    self.assertEqual(values(fields, "upgrade"), [expected])

    def test_other_connection_options_are_still_removed(self) -> None:
        req = request("GET /ws HTTP/1.1", "Host: h", "Connection: upgrade, X-Secret, keep-alive",
                      "Upgrade: websocket", "X-Secret: 1", "Keep-Alive: timeout=5")
        _, fields = parse_head(upstream_request_head(req, "1.2.3.4", "http", "rid"))
        self.assertNotIn("x-secret", names(fields))
        self.assertNotIn("keep-alive", names(fields))
        self.assertEqual(values(fields, "connection"), ["upgrade"])

    def test_switching_protocols_head(self) -> None:
        head = switching_protocols_head(
            response(101, "Upgrade: websocket", "Connection: Upgrade, X-Hop", "X-Hop: 1",
                      "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "X-Request-ID: theirs",
                      reason="Switching Protocols"),
            "rid", [("Strict-Transport-Security", "max-age=300")])
        start, fields = parse_head(head)
        self.assertEqual(start, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(values(fields, "sec-websocket-accept"), ["s3pPLMBiTxaQ9kYGzzhZRbK+xOo="])
        self.assertEqual(values(fields, "x-request-id"), ["rid"])
        self.assertEqual(values(fields, "connection"), ["upgrade"])
        self.assertEqual(values(fields, "upgrade"), ["websocket"])
        self.assertEqual(values(fields, "strict-transport-security"), ["max-age=300"])
        self.assertNotIn("x-hop", names(fields))

    def test_switching_protocols_without_upgrade_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            switching_protocols_head(response(101, "Connection: upgrade"), "rid")

    def test_read_response_head_accepts_101_only_for_an_upgrade(self) -> None:
        raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframe"
        reader = io.BufferedReader(io.BytesIO(raw))  # type: ignore[arg-type]
        head = read_response_head(reader, "GET", Limits(), upgrade=True)
        self.assertEqual((head.status, head.framing.kind, head.reusable), (101, "none", False))
        self.assertEqual(reader.read(), b"frame")  # the new protocol's bytes stay unread
        with self.assertRaisesRegex(ValueError, "switched protocols"):
            read_response_head(io.BufferedReader(io.BytesIO(raw)), "GET", Limits())  # type: ignore[arg-type]


if __name__ == "__main__":
    unittest.main()
