"""Unit tests for http11: the pure HTTP/1.1 rules (RFC 9110 / RFC 9112).

No sockets: every function takes bytes or header lists and returns a
decision.  Tables of inputs, one subTest each.
"""

from __future__ import annotations

import gzip
import itertools
import sys
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import http11  # noqa: E402
from http11 import NO_BODY, BodyFraming, ProtocolError  # noqa: E402

MAX_TARGET = 8192


class ProtocolErrorAssertions(unittest.TestCase):
    def assertProtocolError(self, status, func, *args):
        with self.assertRaises(ProtocolError) as ctx:
            func(*args)
        self.assertEqual(ctx.exception.status, status, ctx.exception.message)
        return ctx.exception


# --- request line ---------------------------------------------------------------

class ParseRequestLineTest(ProtocolErrorAssertions):
    def test_valid_request_lines(self):
        cases = [
            (b"GET / HTTP/1.1\r\n", ("GET", "/", (1, 1))),
            (b"GET /users?id=1&x=%20 HTTP/1.1\r\n", ("GET", "/users?id=1&x=%20", (1, 1))),
            (b"POST /echo HTTP/1.0\r\n", ("POST", "/echo", (1, 0))),
            (b"PUT /a HTTP/1.1\r\n", ("PUT", "/a", (1, 1))),
            (b"PATCH /a HTTP/1.1\r\n", ("PATCH", "/a", (1, 1))),
            (b"DELETE /a HTTP/1.1\r\n", ("DELETE", "/a", (1, 1))),
            (b"HEAD /a HTTP/1.1\r\n", ("HEAD", "/a", (1, 1))),
            # asterisk-form, OPTIONS only (RFC 9112 3.2.4)
            (b"OPTIONS * HTTP/1.1\r\n", ("OPTIONS", "*", (1, 1))),
            (b"OPTIONS /a HTTP/1.1\r\n", ("OPTIONS", "/a", (1, 1))),
            # absolute-form (RFC 9112 3.2.2), scheme is case-insensitive
            (b"GET http://example.com/x?y HTTP/1.1\r\n", ("GET", "http://example.com/x?y", (1, 1))),
            (b"GET https://example.com/ HTTP/1.1\r\n", ("GET", "https://example.com/", (1, 1))),
            (b"GET HTTP://example.com/ HTTP/1.1\r\n", ("GET", "HTTP://example.com/", (1, 1))),
            # extension methods are tokens
            (b"PURGE /a HTTP/1.1\r\n", ("PURGE", "/a", (1, 1))),
        ]
        for line, (method, target, version) in cases:
            with self.subTest(line=line):
                parsed = http11.parse_request_line(line, MAX_TARGET)
                self.assertEqual((parsed.method, parsed.target, parsed.version),
                                 (method, target, version))

    def test_malformed_request_lines_are_400(self):
        cases = [
            b"GET /a b HTTP/1.1\r\n",          # space in the target
            b"GET /a%20b c HTTP/1.1\r\n",
            b"GET / HTTP/1.1\n",               # bare LF
            b"GET / HTTP/1.1",                 # no line terminator
            b"GET / HTTP/1.1\r",               # bare CR
            b"GET / HTTP/1.1\r\r\n",
            b"GET / http/1.1\r\n",             # version is case-sensitive
            b"GET / Http/1.1\r\n",
            b"GET / HTTP/1\r\n",
            b"GET / HTTP/1.1.1\r\n",
            b"GET / HTTP/11.1\r\n",
            b"GET / HTTP/1.x\r\n",
            b"GET / HTTP/ 1.1\r\n",
            b"GET / HTTP/1.1 \r\n",            # trailing space
            b"GET  / HTTP/1.1\r\n",            # two spaces
            b" GET / HTTP/1.1\r\n",            # leading space
            b"GET\t/\tHTTP/1.1\r\n",           # tabs are not separators
            b"GET /\r\n",                      # HTTP/0.9 style
            b"GET\r\n",
            b"\r\n",
            b"garbage\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\r\n",  # TLS hello on a plain port
            b"G(T / HTTP/1.1\r\n",             # method is not a token
            b"GE\xc9T / HTTP/1.1\r\n",
            b" / HTTP/1.1\r\n",                # empty method
            b"GET  HTTP/1.1\r\n",              # empty target
            b"GET /\x00 HTTP/1.1\r\n",         # control characters in the target
            b"GET /\x7f HTTP/1.1\r\n",
            b"GET /a\x0bb HTTP/1.1\r\n",
            b"GET * HTTP/1.1\r\n",             # asterisk-form only for OPTIONS
            b"POST * HTTP/1.1\r\n",
            b"GET example.com/x HTTP/1.1\r\n",  # neither origin- nor absolute-form
            b"GET ftp://example.com/ HTTP/1.1\r\n",
            b"GET a HTTP/1.1\r\n",
        ]
        for line in cases:
            with self.subTest(line=line):
                self.assertProtocolError(400, http11.parse_request_line, line, MAX_TARGET)

    def test_unsupported_well_formed_version_is_505(self):
        for version in (b"HTTP/1.2", b"HTTP/2.0", b"HTTP/3.0", b"HTTP/0.9", b"HTTP/9.9"):
            with self.subTest(version=version):
                self.assertProtocolError(505, http11.parse_request_line,
                                         b"GET / " + version + b"\r\n", MAX_TARGET)

    def test_too_long_target_is_414(self):
        limit = 64
        exact = b"/" + b"a" * (limit - 1)
        parsed = http11.parse_request_line(b"GET " + exact + b" HTTP/1.1\r\n", limit)
        self.assertEqual(parsed.target, exact.decode())
        for target in (exact + b"a", b"/" + b"a" * 10 * limit):
            with self.subTest(length=len(target)):
                self.assertProtocolError(414, http11.parse_request_line,
                                         b"GET " + target + b" HTTP/1.1\r\n", limit)
        self.assertProtocolError(414, http11.parse_request_line,
                                 b"GET http://example.com/" + b"a" * limit + b" HTTP/1.1\r\n", limit)


class SplitAbsoluteFormTest(unittest.TestCase):
    """Absolute-form targets (RFC 9112 3.2.2) are checked, and split into Host and origin-form."""

    def test_valid_targets(self) -> None:
        cases = {
            "http://example.com:8080/p?q=1": ("example.com:8080", "/p?q=1"),
            "http://example.com": ("example.com", "/"),
            "http://example.com?x=1": ("example.com", "/?x=1"),
            "http://127.0.0.1/a/b": ("127.0.0.1", "/a/b"),
            "http://[::1]:80/": ("[::1]:80", "/"),
        }
        for target, expected in cases.items():
            with self.subTest(target):
                self.assertEqual(http11.split_absolute_form(target), expected)

    def test_malformed_targets_are_400(self) -> None:
        for target in ("http://[x/", "http://user:pw@evil/", "http://user@evil/", "http:///x",
                       "http://", "http://example.com:99999/", "http://example.com:abc/",
                       "http://exa mple.com/"):
            with self.subTest(target):
                with self.assertRaises(ProtocolError) as ctx:
                    http11.split_absolute_form(target)
                self.assertEqual(ctx.exception.status, 400)


# --- header fields ---------------------------------------------------------------

class ParseFieldLineTest(ProtocolErrorAssertions):
    def test_valid_field_lines(self):
        cases = [
            (b"Host: example.com\r\n", ("Host", "example.com")),
            (b"Host:example.com\r\n", ("Host", "example.com")),
            (b"Host: example.com:8080\r\n", ("Host", "example.com:8080")),
            # OWS before and after the value is not part of it
            (b"X-A: \t spaced  inner \t \r\n", ("X-A", "spaced  inner")),
            (b"X-A: a\tb\r\n", ("X-A", "a\tb")),  # HTAB inside a value is allowed
            (b"X-A:\r\n", ("X-A", "")),
            (b"X-A:   \r\n", ("X-A", "")),
            # obs-text (0x80-0xFF) is allowed and kept byte for byte (latin-1)
            (b"X-A: caf\xe9 \x80\xff\r\n", ("X-A", "caf\xe9 \x80\xff")),
            (b"!#$%&'*+-.^_`|~09azAZ: v\r\n", ("!#$%&'*+-.^_`|~09azAZ", "v")),
            (b"x-lower: v:w:x\r\n", ("x-lower", "v:w:x")),
        ]
        for line, expected in cases:
            with self.subTest(line=line):
                self.assertEqual(http11.parse_field_line(line), expected)

    def test_invalid_field_lines_are_400(self):
        cases = {
            b"Host : example.com\r\n": "space before colon",
            b"Host\t: example.com\r\n": "tab before colon",
            b" folded\r\n": "obs-fold (space)",
            b"\tfolded\r\n": "obs-fold (tab)",
            b"X-A: a\x00b\r\n": "NUL in value",
            b"X-A: a\rb\r\n": "CR in value",
            b"X-A: a\nb\r\n": "LF in value",
            b"X-A: a\r\r\n": "CR at end of value",
            b"X-A: a\x7f\r\n": "DEL in value",
            b"X-A: a\x01\r\n": "control in value",
            b"X-A: a\x1b[0m\r\n": "escape in value",
            b"X(A): 1\r\n": "parenthesis in name",
            b"X A: 1\r\n": "space in name",
            b"X/A: 1\r\n": "slash in name",
            b"X@A: 1\r\n": "at sign in name",
            b"[X]: 1\r\n": "brackets in name",
            b"X\"A: 1\r\n": "quote in name",
            b"X\xe9: 1\r\n": "non-ASCII name",
            b"X\x00: 1\r\n": "NUL in name",
            b": value\r\n": "empty name",
            b"no colon\r\n": "no colon",
            b"NoColon\r\n": "no colon, token only",
            b"X-A: v\n": "bare LF",
            b"X-A: v": "no terminator",
        }
        for line, why in cases.items():
            with self.subTest(why=why, line=line):
                self.assertProtocolError(400, http11.parse_field_line, line)


class ParseTrailerLineTest(unittest.TestCase):
    """RFC 9112 7.1.2: trailer field lines have exactly the header field line syntax."""

    def test_valid_trailer_lines(self):
        cases = [
            (b"X-Checksum: abc\r\n", ("X-Checksum", "abc")),
            (b"X-Checksum:abc\r\n", ("X-Checksum", "abc")),
            (b"Server-Timing: db;dur=53, app;dur=47.2\r\n", ("Server-Timing", "db;dur=53, app;dur=47.2")),
            (b"X-A:\r\n", ("X-A", "")),
            (b"X-A: caf\xe9\r\n", ("X-A", "caf\xe9")),
        ]
        for line, expected in cases:
            with self.subTest(line=line):
                self.assertEqual(http11.parse_trailer_line(line), expected)

    def test_invalid_trailer_lines_are_value_errors(self):
        cases = {
            b"\rGET /hidden HTTP/1.1\r\n": "bare CR before a request line",
            b"GET /hidden HTTP/1.1\r\n": "a request line",
            b"12345POST /echo HTTP/1.1\r\n": "digits glued to a request line",
            b"X-A: a\x00b\r\n": "NUL in value",
            b"X-A\x00: b\r\n": "NUL in name",
            b"X-A: a\rb\r\n": "bare CR in value",
            b"X-A: a\x1b\r\n": "control in value",
            b"X-A: v\n": "bare LF",
            b"no colon\r\n": "no colon",
            b"X-A : v\r\n": "space before colon",
            b" folded\r\n": "obs-fold",
            b"\tfolded\r\n": "obs-fold with a tab",
            b": v\r\n": "empty name",
            b"X-A: v": "no terminator",
        }
        for line, why in cases.items():
            with self.subTest(why=why, line=line):
                with self.assertRaises(ValueError) as ctx:
                    http11.parse_trailer_line(line)
                self.assertIn("trailer", str(ctx.exception))


# --- request framing -------------------------------------------------------------

def fields(*lines: bytes) -> list[tuple[str, str]]:
    """Headers as the reader produces them (values trimmed by parse_field_line)."""
    return [http11.parse_field_line(line + b"\r\n") for line in lines]


class RequestFramingTest(ProtocolErrorAssertions):
    def test_valid_framing(self):
        cases = [
            ((), (1, 1), "none", 0),
            ((b"Content-Length: 0",), (1, 1), "none", 0),
            ((b"Content-Length: 5",), (1, 1), "length", 5),
            ((b"content-length: 5",), (1, 0), "length", 5),
            ((b"Content-Length:   5  ",), (1, 1), "length", 5),  # OWS trimmed by the field parser
            ((b"Content-Length: 5", b"Content-Length: 5"), (1, 1), "length", 5),
            ((b"Content-Length: 5, 5",), (1, 1), "length", 5),
            ((b"Content-Length: 5,5, 5",), (1, 1), "length", 5),
            ((b"Content-Length: 007",), (1, 1), "length", 7),  # 1*DIGIT
            ((b"Content-Length: 999999999999999999",), (1, 1), "length", 999999999999999999),
            ((b"Transfer-Encoding: chunked",), (1, 1), "chunked", 0),
            ((b"Transfer-Encoding: Chunked",), (1, 1), "chunked", 0),
            ((b"transfer-encoding: CHUNKED",), (1, 1), "chunked", 0),
        ]
        for lines, version, kind, length in cases:
            with self.subTest(lines=lines, version=version):
                framing = http11.request_framing(fields(*lines), version)
                self.assertEqual(framing.kind, kind)
                if kind == "length":
                    self.assertEqual(framing.length, length)
                self.assertEqual(framing.has_body, kind != "none")

    def test_invalid_framing_is_400(self):
        cases = {
            "CL and TE": (b"Content-Length: 5", b"Transfer-Encoding: chunked"),
            "TE and CL": (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
            "CL 0 and TE": (b"Content-Length: 0", b"Transfer-Encoding: chunked"),
            "different CLs": (b"Content-Length: 5", b"Content-Length: 6"),
            "different CLs in a list": (b"Content-Length: 5, 6",),
            "CL 1,2": (b"Content-Length: 1,2",),
            "CL +5": (b"Content-Length: +5",),
            "CL 0x10": (b"Content-Length: 0x10",),
            "CL empty": (b"Content-Length: ",),
            "CL -1": (b"Content-Length: -1",),
            "CL 1 2": (b"Content-Length: 1 2",),
            "CL 5.0": (b"Content-Length: 5.0",),
            "CL 5e2": (b"Content-Length: 5e2",),
            "CL 1_0": (b"Content-Length: 1_0",),
            "CL trailing comma": (b"Content-Length: 5,",),
            "CL abc": (b"Content-Length: abc",),
            "CL superscript two": (b"Content-Length: \xb2",),  # str.isdigit() is True for it
            "TE gzip": (b"Transfer-Encoding: gzip",),
            "TE identity": (b"Transfer-Encoding: identity",),
            "TE chunked, gzip": (b"Transfer-Encoding: chunked, gzip",),
            "TE chunked, chunked": (b"Transfer-Encoding: chunked, chunked",),
            "TE chunked twice in two fields": (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
            "TE chunked, identity": (b"Transfer-Encoding: chunked, identity",),
            "TE empty": (b"Transfer-Encoding: ",),
            "TE unknown": (b"Transfer-Encoding: foo",),
        }
        for why, lines in cases.items():
            with self.subTest(why=why):
                self.assertProtocolError(400, http11.request_framing, fields(*lines), (1, 1))

    def test_huge_content_length_is_rejected_without_overflow(self):
        for value in (b"9" * 19, b"9" * 40, b"18446744073709551616", b"1" + b"0" * 100):
            with self.subTest(value=value):
                with self.assertRaises(ProtocolError) as ctx:
                    http11.request_framing(fields(b"Content-Length: " + value), (1, 1))
                self.assertIn(ctx.exception.status, (400, 413))

    def test_unsupported_coding_before_chunked_is_501(self):
        cases = [
            (b"Transfer-Encoding: gzip, chunked",),
            (b"Transfer-Encoding: deflate, chunked",),
            (b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"),
        ]
        for lines in cases:
            with self.subTest(lines=lines):
                self.assertProtocolError(501, http11.request_framing, fields(*lines), (1, 1))

    def test_transfer_encoding_in_http10_request_is_400(self):
        self.assertProtocolError(400, http11.request_framing,
                                 fields(b"Transfer-Encoding: chunked"), (1, 0))

    def test_content_length_helper(self):
        self.assertIsNone(http11.content_length([]))
        self.assertEqual(http11.content_length(["5"]), 5)
        self.assertEqual(http11.content_length(["5", "5", "5"]), 5)
        self.assertEqual(http11.content_length(["0"]), 0)
        # parse_field_line trims OWS, so untrimmed elements never reach it;
        # given directly they are not 1*DIGIT.
        for values in ([" 5 "], ["5", "6"], ["+5"], ["0x10"], [""], ["-1"], ["1 2"], ["9" * 19]):
            with self.subTest(values=values):
                with self.assertRaises(ValueError):
                    http11.content_length(values)


# --- response framing ------------------------------------------------------------

class ResponseFramingTest(unittest.TestCase):
    def test_responses_without_body(self):
        with_body_fields = [fields(b"Content-Length: 10"), fields(b"Transfer-Encoding: chunked"),
                            fields(b"Content-Length: 10", b"Transfer-Encoding: chunked"), []]
        cases = [("HEAD", 200), ("HEAD", 404), ("GET", 204), ("GET", 304), ("GET", 100),
                 ("GET", 103), ("GET", 199), ("POST", 204)]
        for (method, status), headers in itertools.product(cases, with_body_fields):
            with self.subTest(method=method, status=status, headers=headers):
                framing = http11.response_framing(status, method, headers)
                self.assertEqual(framing.kind, "none")
                self.assertFalse(framing.has_body)

    def test_body_framing(self):
        cases = [
            ((b"Content-Length: 10",), "length", 10),
            ((b"Content-Length: 0",), "length", 0),
            ((b"Content-Length: 5, 5",), "length", 5),
            ((b"Content-Length: 5", b"Content-Length: 5"), "length", 5),
            ((b"Transfer-Encoding: chunked",), "chunked", 0),
            ((b"Transfer-Encoding: CHUNKED",), "chunked", 0),
            # RFC 9112 6.3 (3): both present, chunked wins
            ((b"Content-Length: 10", b"Transfer-Encoding: chunked"), "chunked", 0),
            ((b"Transfer-Encoding: chunked", b"Content-Length: 10"), "chunked", 0),
            ((), "close", 0),  # 6.3 (8)
            ((b"Content-Type: text/plain",), "close", 0),
        ]
        for lines, kind, length in cases:
            with self.subTest(lines=lines):
                framing = http11.response_framing(200, "GET", fields(*lines))
                self.assertEqual(framing.kind, kind)
                if kind == "length":
                    self.assertEqual(framing.length, length)
                    self.assertEqual(framing.has_body, length > 0)

    def test_unforwardable_framing_raises_value_error(self):
        cases = {
            "TE gzip": (b"Transfer-Encoding: gzip",),
            "TE gzip, chunked": (b"Transfer-Encoding: gzip, chunked",),
            "TE chunked, gzip": (b"Transfer-Encoding: chunked, gzip",),
            "TE chunked, chunked": (b"Transfer-Encoding: chunked, chunked",),
            "TE identity": (b"Transfer-Encoding: identity",),
            "TE gzip + CL": (b"Transfer-Encoding: gzip", b"Content-Length: 5"),
            "different CLs": (b"Content-Length: 5", b"Content-Length: 6"),
            "CL list 5, 6": (b"Content-Length: 5, 6",),
            "CL abc": (b"Content-Length: abc",),
            "CL -1": (b"Content-Length: -1",),
            "CL +5": (b"Content-Length: +5",),
            "CL empty": (b"Content-Length: ",),
        }
        for why, lines in cases.items():
            with self.subTest(why=why):
                with self.assertRaises(ValueError):
                    http11.response_framing(200, "GET", fields(*lines))

    # An invalid Content-Length on a HEAD or 304 answer (no body either way) is
    # still a broken answer: a 502, not a silently accepted one.
    BAD_BODILESS_LENGTHS = {
        "two different": [("Content-Length", "5"), ("Content-Length", "7")],
        "letters": [("Content-Length", "abc")],
        "list": [("Content-Length", "5, 7")],
        "negative": [("Content-Length", "-1")],
        "empty": [("Content-Length", "")],
    }

    def test_invalid_content_length_on_head_or_304_is_rejected(self) -> None:
        for status, method in ((200, "HEAD"), (304, "GET"), (304, "HEAD")):
            for name, headers in self.BAD_BODILESS_LENGTHS.items():
                with self.subTest(status=status, method=method, case=name):
                    with self.assertRaises(ValueError):
                        http11.response_framing(status, method, headers)

    def test_valid_content_length_on_head_or_304_means_no_body(self) -> None:
        for status, method in ((200, "HEAD"), (304, "GET")):
            for headers in ([("Content-Length", "5")], [("Content-Length", "5"), ("Content-Length", "5")],
                            []):
                with self.subTest(status=status, method=method, headers=headers):
                    self.assertEqual(http11.response_framing(status, method, headers), NO_BODY)


# --- status line -----------------------------------------------------------------

class ParseStatusLineTest(unittest.TestCase):
    def test_valid_status_lines(self):
        cases = [
            (b"HTTP/1.1 200 OK\r\n", ((1, 1), 200, "OK")),
            (b"HTTP/1.0 404 Not Found\r\n", ((1, 0), 404, "Not Found")),
            (b"HTTP/1.1 204 \r\n", ((1, 1), 204, "")),
            (b"HTTP/1.1 100 Continue\r\n", ((1, 1), 100, "Continue")),
            (b"HTTP/1.1 599 Custom\tReason\r\n", ((1, 1), 599, "Custom\tReason")),
            (b"HTTP/1.1 200 caf\xe9\r\n", ((1, 1), 200, "caf\xe9")),
        ]
        for line, expected in cases:
            with self.subTest(line=line):
                self.assertEqual(http11.parse_status_line(line), expected)

    def test_invalid_status_lines(self):
        cases = [
            b"HTTP/1.1 200 OK\n", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK\r",
            b"http/1.1 200 OK\r\n", b"HTTP/2.0 200 OK\r\n", b"HTTP/2 200 OK\r\n",
            b"HTTP/1 200 OK\r\n", b"HTTP/1.1 20 OK\r\n", b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 abc OK\r\n", b"HTTP/1.1 -20 OK\r\n", b"HTTP/1.1 +20 OK\r\n",
            b"HTTP/1.1 099 OK\r\n", b"HTTP/1.1 000 OK\r\n", b"HTTP/1.1  200 OK\r\n",
            b"HTTP/1.1 200 O\x00K\r\n", b"HTTP/1.1 200 O\rK\r\n", b"ICY 200 OK\r\n",
            b"garbage\r\n", b"\r\n", b"",
        ]
        for line in cases:
            with self.subTest(line=line):
                with self.assertRaises(ValueError):
                    http11.parse_status_line(line)


# --- chunk size ------------------------------------------------------------------

class ParseChunkSizeTest(unittest.TestCase):
    def test_valid_chunk_sizes(self):
        cases = [
            (b"0\r\n", 0), (b"a\r\n", 10), (b"A\r\n", 10), (b"10\r\n", 16), (b"ff\r\n", 255),
            (b"FF\r\n", 255), (b"0010\r\n", 16), (b"1a2B3c\r\n", 0x1A2B3C),
            (b"10;ext\r\n", 16), (b"10;name=value\r\n", 16), (b'10;name="quoted;value"\r\n', 16),
            (b"5;a=1;b=2\r\n", 5), (b"0;last\r\n", 0),
        ]
        for line, size in cases:
            with self.subTest(line=line):
                self.assertEqual(http11.parse_chunk_size(line), size)

    def test_invalid_chunk_sizes(self):
        cases = [
            b"0x10\r\n", b"0X10\r\n", b"+5\r\n", b"-5\r\n", b" 5\r\n", b"\t5\r\n", b"5 \r\n",
            b"1_0\r\n", b"\r\n", b";ext\r\n", b"zz\r\n", b"g\r\n", b"5g\r\n",
            b"5", b"5\n", b"5\r", b"5\r\r\n", b"5\n\r\n", b"",
            b"1" * 17 + b"\r\n",  # absurdly large: no arbitrary-precision surprises
        ]
        for line in cases:
            with self.subTest(line=line):
                with self.assertRaises(ValueError):
                    http11.parse_chunk_size(line)

    def test_whitespace_before_an_extension_is_allowed(self) -> None:
        for line, size in ((b"5 ;ext\r\n", 5), (b"5\t;ext=1\r\n", 5), (b"a  ; name=\"v\"\r\n", 10),
                           (b"5;ext\r\n", 5), (b"5\r\n", 5)):
            with self.subTest(line):
                self.assertEqual(http11.parse_chunk_size(line), size)

    def test_whitespace_without_an_extension_or_before_the_size_is_rejected(self) -> None:
        for line in (b"5 \r\n", b" 5;ext\r\n", b" ;ext\r\n", b"5 6;ext\r\n"):
            with self.subTest(line):
                with self.assertRaises(ValueError):
                    http11.parse_chunk_size(line)


# --- connection management ----------------------------------------------------------

class HopByHopTest(unittest.TestCase):
    def test_every_hop_by_hop_name_is_dropped_case_insensitively(self):
        names = ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer",
                 "Transfer-Encoding", "Upgrade"]
        for name in names:
            for spelling in (name, name.lower(), name.upper()):
                with self.subTest(name=spelling):
                    headers = [("Host", "a"), (spelling, "x"), ("X-Keep", "k")]
                    self.assertEqual(http11.end_to_end(headers), [("Host", "a"), ("X-Keep", "k")])

    def test_fields_named_in_connection_are_dropped(self):
        headers = [
            ("Host", "a"),
            ("Connection", "close, X-Drop"),
            ("X-Drop", "1"),
            ("x-drop", "2"),
            ("X-Keep", "k"),
            ("Keep-Alive", "timeout=5"),
            ("CONNECTION", " x-other ,X-THIRD"),
            ("X-Other", "o"),
            ("x-third", "t"),
            ("Content-Type", "text/plain"),
        ]
        self.assertEqual(http11.end_to_end(headers),
                         [("Host", "a"), ("X-Keep", "k"), ("Content-Type", "text/plain")])

    def test_connection_named_field_before_connection_is_dropped_too(self):
        headers = [("X-Drop", "1"), ("Connection", "X-Drop"), ("X-Keep", "k")]
        self.assertEqual(http11.end_to_end(headers), [("X-Keep", "k")])

    def test_extra_drop_and_order_preserved(self):
        headers = [("B", "1"), ("Content-Length", "5"), ("A", "2"), ("b", "3")]
        self.assertEqual(http11.end_to_end(headers, ("content-length",)),
                         [("B", "1"), ("A", "2"), ("b", "3")])
        self.assertEqual(http11.end_to_end([]), [])

    def test_connection_options_and_keep_alive(self):
        self.assertEqual(http11.connection_options(fields(b"Connection: Keep-Alive, Upgrade",
                                                          b"connection: CLOSE")),
                         {"keep-alive", "upgrade", "close"})
        self.assertEqual(http11.connection_options([]), set())
        cases = [
            ((1, 1), set(), True),
            ((1, 1), {"keep-alive"}, True),
            ((1, 1), {"close"}, False),
            ((1, 1), {"keep-alive", "close"}, False),
            ((1, 0), set(), False),
            ((1, 0), {"keep-alive"}, True),
            ((1, 0), {"keep-alive", "close"}, False),
            ((1, 0), {"close"}, False),
        ]
        for version, options, expected in cases:
            with self.subTest(version=version, options=options):
                self.assertEqual(http11.wants_keep_alive(version, options), expected)


class ForwardedTest(unittest.TestCase):
    def test_appends_to_existing_chain_and_replaces_spoofed_fields(self):
        headers = [
            ("Host", "shop.example"),
            ("X-Forwarded-For", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2, 4.4.4.4"),
            ("X-Forwarded-Proto", "https"),
            ("X-FORWARDED-HOST", "evil.example"),
            ("Accept", "*/*"),
        ]
        result = http11.append_forwarded(headers, "3.3.3.3", "http", "shop.example")
        lowered = [(n.lower(), v) for n, v in result]
        self.assertEqual([v for n, v in lowered if n == "x-forwarded-for"],
                         ["1.1.1.1, 2.2.2.2, 4.4.4.4, 3.3.3.3"])
        self.assertEqual([v for n, v in lowered if n == "x-forwarded-proto"], ["http"])
        self.assertEqual([v for n, v in lowered if n == "x-forwarded-host"], ["shop.example"])
        self.assertIn(("Host", "shop.example"), result)
        self.assertIn(("Accept", "*/*"), result)
        self.assertEqual(headers[1], ("X-Forwarded-For", "1.1.1.1"), "input must not be mutated")

    def test_without_previous_chain(self):
        result = http11.append_forwarded([("Host", "h")], "10.0.0.1", "http", "h")
        self.assertEqual(result, [("Host", "h"), ("X-Forwarded-For", "10.0.0.1"),
                                  ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "h")])

    def test_no_host_still_removes_spoofed_forwarded_host(self):
        result = http11.append_forwarded([("X-Forwarded-Host", "evil")], "::1", "http", None)
        self.assertEqual(result, [("X-Forwarded-For", "::1"), ("X-Forwarded-Proto", "http")])


class MayRetryTest(unittest.TestCase):
    def test_truth_table(self):
        idempotent = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"}
        methods = sorted(idempotent | {"POST", "PATCH", "CONNECT", "get"})
        for method, sent, started, replayable in itertools.product(
                methods, (False, True), (False, True), (False, True)):
            if started:
                expected = False  # a response byte reached the client: never
            elif not sent:
                expected = True  # nothing reached a backend: always safe
            else:
                expected = method in idempotent and replayable
            with self.subTest(method=method, sent=sent, started=started, replayable=replayable):
                self.assertEqual(http11.may_retry(method, sent, started, replayable), expected)


# --- gzip -----------------------------------------------------------------------

class AcceptsGzipTest(unittest.TestCase):
    def test_table(self):
        cases = [
            (None, False),
            ("", False),
            ("gzip", True),
            ("GZIP", True),
            ("Gzip", True),
            ("x-gzip", True),
            ("gzip, deflate, br", True),
            ("br, gzip", True),
            ("deflate, gzip;q=0.5", True),
            ("gzip;q=1", True),
            ("gzip;q=1.0", True),
            ("gzip;q=0.001", True),
            ("gzip ; q=0.8", True),
            ("gzip;level=1", True),
            ("gzip;q=0", False),
            ("gzip; q=0", False),
            ("gzip; q=0.0", False),
            ("gzip;q=0.000", False),
            ("gzip;Q=0", False),
            ("gzip ; q = 0", False),
            ("deflate, gzip;q=0", False),
            ("*", True),
            ("*;q=0.5", True),
            ("*;q=0", False),
            ("*, gzip;q=0", False),
            ("gzip;q=0, *", False),
            ("*;q=1, gzip;q=0", False),
            ("identity", False),
            ("identity, *;q=0", False),
            ("deflate", False),
            ("br", False),
            ("gzipx", False),
            ("deflate, br;q=0.5", False),
            # malformed q: not a clear request for gzip, so do not compress
            ("gzip;q=abc", False),
            ("gzip;q=", False),
        ]
        for value, expected in cases:
            with self.subTest(accept_encoding=value):
                self.assertEqual(http11.accepts_gzip(value), expected)


class ShouldGzipTest(unittest.TestCase):
    BASE = dict(method="GET", status=200, response_headers=[("Content-Type", "application/json")],
                accept_encoding="gzip", body_length=1000, min_length=256)

    def check(self, expected, **changes):
        args = dict(self.BASE, **changes)
        self.assertEqual(http11.should_gzip(args["method"], args["status"], args["response_headers"],
                                            args["accept_encoding"], args["body_length"],
                                            args["min_length"]), expected)

    def test_base_case_compresses(self):
        self.check(True)

    def test_each_condition(self):
        ct = "Content-Type"
        cases = [
            ("HEAD", dict(method="HEAD"), False),
            ("POST", dict(method="POST"), True),
            ("204", dict(status=204), False),
            ("304", dict(status=304), False),
            ("206", dict(status=206), False),
            ("100", dict(status=100), False),
            ("404 json", dict(status=404), True),
            ("500 json", dict(status=500), True),
            ("too small", dict(body_length=255), False),
            ("exactly the minimum", dict(body_length=256), True),
            ("unknown length", dict(body_length=None), True),
            ("client did not ask", dict(accept_encoding=None), False),
            ("client asked for br only", dict(accept_encoding="br"), False),
            ("client forbids gzip", dict(accept_encoding="gzip;q=0"), False),
            ("client star", dict(accept_encoding="*"), True),
            ("already gzip", dict(response_headers=[(ct, "text/html"), ("Content-Encoding", "gzip")]), False),
            ("already br", dict(response_headers=[(ct, "text/html"), ("content-encoding", "br")]), False),
            ("identity encoding", dict(response_headers=[(ct, "text/html"), ("Content-Encoding", "identity")]), True),
            ("no-transform", dict(response_headers=[(ct, "text/html"), ("Cache-Control", "public, no-transform")]), False),
            ("no-transform upper", dict(response_headers=[(ct, "text/html"), ("cache-control", "No-Transform")]), False),
            ("other cache-control", dict(response_headers=[(ct, "text/html"), ("Cache-Control", "max-age=60")]), True),
            ("content-range", dict(response_headers=[(ct, "text/html"), ("Content-Range", "bytes 0-9/100")]), False),
            ("no content-type", dict(response_headers=[]), False),
            ("text/html charset", dict(response_headers=[(ct, "text/html; charset=utf-8")]), True),
            ("TEXT/PLAIN", dict(response_headers=[(ct, "TEXT/PLAIN")]), True),
            ("text/css", dict(response_headers=[(ct, "text/css")]), True),
            ("javascript", dict(response_headers=[(ct, "application/javascript")]), True),
            ("xml", dict(response_headers=[(ct, "application/xml")]), True),
            ("svg", dict(response_headers=[(ct, "image/svg+xml")]), True),
            ("+json suffix", dict(response_headers=[(ct, "application/vnd.api+json")]), True),
            ("png", dict(response_headers=[(ct, "image/png")]), False),
            ("jpeg", dict(response_headers=[(ct, "image/jpeg")]), False),
            ("zip", dict(response_headers=[(ct, "application/zip")]), False),
            ("octet-stream", dict(response_headers=[(ct, "application/octet-stream")]), False),
        ]
        for why, changes, expected in cases:
            with self.subTest(why=why):
                self.check(expected, **changes)

    def test_event_stream_is_not_compressible(self) -> None:
        """Server-sent events must reach the client as they come: never gzipped."""
        for value in ("text/event-stream", "text/event-stream; charset=utf-8",
                      "TEXT/Event-Stream", " text/event-stream ;x=1"):
            with self.subTest(value):
                self.assertFalse(http11.is_compressible_type(value))
        self.assertFalse(http11.should_gzip("GET", 200, [("Content-Type", "text/event-stream")],
                                            "gzip", None, 256))

    def test_other_text_types_still_are(self) -> None:
        for value in ("text/plain", "text/html; charset=utf-8", "application/json"):
            with self.subTest(value):
                self.assertTrue(http11.is_compressible_type(value))


class GzipHeadersTest(unittest.TestCase):
    def test_vary_added_when_absent(self):
        result = http11.gzip_headers([("Content-Type", "text/html")])
        self.assertEqual(result, [("Content-Type", "text/html"), ("Content-Encoding", "gzip"),
                                  ("Vary", "Accept-Encoding")])

    def test_vary_merged(self):
        cases = [
            ("Origin", "Origin, Accept-Encoding"),
            ("Origin, Cookie", "Origin, Cookie, Accept-Encoding"),
            ("Accept-Encoding", "Accept-Encoding"),
            ("accept-encoding", "accept-encoding"),
            ("Origin, accept-encoding", "Origin, accept-encoding"),
            ("*", "*"),
        ]
        for vary, expected in cases:
            with self.subTest(vary=vary):
                result = http11.gzip_headers([("Vary", vary), ("Content-Type", "text/html")])
                self.assertEqual([v for n, v in result if n.lower() == "vary"], [expected])
                self.assertEqual([v for n, v in result if n.lower() == "content-encoding"], ["gzip"])

    def test_etag(self):
        cases = [('"abc"', 'W/"abc"'), ('W/"abc"', 'W/"abc"'), ('""', 'W/""')]
        for etag, expected in cases:
            with self.subTest(etag=etag):
                result = http11.gzip_headers([("ETag", etag)])
                self.assertEqual([v for n, v in result if n.lower() == "etag"], [expected])

    def test_existing_content_encoding_replaced(self):
        result = http11.gzip_headers([("Content-Encoding", "identity"), ("X", "1")])
        self.assertEqual([v for n, v in result if n.lower() == "content-encoding"], ["gzip"])
        self.assertIn(("X", "1"), result)

    def test_compressors_produce_gzip(self):
        body = b'{"users": []}' * 200
        self.assertEqual(gzip.decompress(http11.gzip_compress(body, 5)), body)
        stream = http11.gzip_stream(6)
        data = b"".join(stream.compress(body[i:i + 100]) for i in range(0, len(body), 100))
        self.assertEqual(gzip.decompress(data + stream.flush()), body)

    def test_encoded_false_gives_304_fields_without_content_encoding(self) -> None:
        """A 304 or HEAD answer to a gzip client carries the gzipped 200's Vary and weak ETag."""
        headers = [("ETag", '"abc"'), ("Content-Type", "application/json")]
        result = http11.gzip_headers(list(headers), encoded=False)
        names = [name.lower() for name, _ in result]
        self.assertNotIn("content-encoding", names)
        self.assertEqual(http11.get_field(result, "etag"), 'W/"abc"')
        self.assertEqual(http11.get_field(result, "vary"), "Accept-Encoding")

    def test_encoded_false_extends_an_existing_vary(self) -> None:
        result = http11.gzip_headers([("Vary", "Origin"), ("ETag", 'W/"x"')], encoded=False)
        self.assertEqual([v for n, v in result if n.lower() == "vary"], ["Origin, Accept-Encoding"])
        self.assertEqual(http11.get_field(result, "etag"), 'W/"x"')  # already weak: unchanged
        self.assertIsNone(http11.get_field(result, "content-encoding"))

    def test_default_still_adds_content_encoding(self) -> None:
        result = http11.gzip_headers([("ETag", '"abc"')])
        self.assertEqual(http11.get_field(result, "content-encoding"), "gzip")
        self.assertEqual(http11.get_field(result, "etag"), 'W/"abc"')


# --- Host and serialisation ----------------------------------------------------------

class ValidHostTest(unittest.TestCase):
    def test_table(self):
        cases = [
            ("example.com", True), ("example.com:8080", True), ("localhost", True),
            ("127.0.0.1", True), ("127.0.0.1:80", True), ("[::1]", True), ("[::1]:8080", True),
            ("[2001:db8::1]:443", True), ("xn--bcher-kva.example", True), ("a-b_c~d", True),
            ("example.com:", True),  # port = *DIGIT (RFC 3986 3.2.3)
            ("", True),  # RFC 9110 7.2: empty Host when the target has no authority
            ("exa mple.com", False), ("example.com/path", False), ("user@example.com", False),
            ("example.com:http", False), ("example.com:80:80", False), ("[::1", False),
            ("::1", False), ("example.com\t", False), ("exa\x00mple", False),
            ("example.com?", False), ("example.com#", False), ("ex\\ample", False),
        ]
        for value, expected in cases:
            with self.subTest(host=value):
                self.assertEqual(http11.valid_host(value), expected)


class ValidRequestIdTest(unittest.TestCase):
    def test_table(self):
        cases = [("abc-123", True), ("0f8e:1.2_x", True), ("a" * 128, True), (None, False),
                 ("", False), ("a" * 129, False), ("a b", False), ("a\r\nX-Evil: 1", False),
                 ("caf\xe9", False), ("a\"b", False), ("a,b", False)]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(http11.valid_request_id(value), expected)


class SerializeTest(unittest.TestCase):
    def test_serialize_head(self):
        self.assertEqual(http11.serialize_head("HTTP/1.1 200 OK", [("A", "1"), ("B-C", "x y")]),
                         b"HTTP/1.1 200 OK\r\nA: 1\r\nB-C: x y\r\n\r\n")
        self.assertEqual(http11.serialize_head("HTTP/1.1 204 No Content", []),
                         b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(http11.serialize_head("GET / HTTP/1.1", [("X", "caf\xe9")]),
                         b"GET / HTTP/1.1\r\nX: caf\xe9\r\n\r\n")

    def test_round_trip_through_parsers(self):
        headers = [("Host", "a:1"), ("X-A", "v\xff")]
        head = http11.serialize_head("GET /x HTTP/1.1", headers)
        lines = head.split(b"\r\n")
        self.assertEqual(http11.parse_request_line(lines[0] + b"\r\n", MAX_TARGET).target, "/x")
        self.assertEqual([http11.parse_field_line(line + b"\r\n") for line in lines[1:3]], headers)
        self.assertEqual(lines[3:], [b"", b""])

    def test_chunk(self):
        self.assertEqual(http11.chunk(b"hello"), b"5\r\nhello\r\n")
        self.assertEqual(http11.chunk(b"x" * 26), b"1a\r\n" + b"x" * 26 + b"\r\n")
        self.assertEqual(http11.LAST_CHUNK, b"0\r\n\r\n")

    def test_body_framing_has_body(self):
        self.assertFalse(BodyFraming("none").has_body)
        self.assertFalse(BodyFraming("length", 0).has_body)
        self.assertTrue(BodyFraming("length", 1).has_body)
        self.assertTrue(BodyFraming("chunked").has_body)
        self.assertTrue(BodyFraming("close").has_body)


if __name__ == "__main__":
    unittest.main()
