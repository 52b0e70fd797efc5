"""proxy_protocol.py: PROXY protocol v1/v2 headers, table-driven, plus a few real sockets."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time
import unittest

from proxy_protocol import (V1_MAX_LENGTH, V2_MAX_LENGTH, V2_SIGNATURE, ProxyHeader, ProxyProtocolError,
                            parse_proxy_header, read_proxy_header)

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    """A v2 header: signature, version/command byte, family/protocol byte, length, block."""
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(block) if length is None else length) \
        + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


IPV4_BLOCK = socket.inet_aton("192.0.2.1") + socket.inet_aton("198.51.100.2") + struct.pack("!HH", 56324, 443)
IPV6_BLOCK = (socket.inet_pton(socket.AF_INET6, "2001:db8::1") + socket.inet_pton(socket.AF_INET6, "2001:db8::2")
              + struct.pack("!HH", 65535, 0))
UNIX_BLOCK = b"/run/src.sock".ljust(108, b"\0") + b"/run/dst.sock".ljust(108, b"\0")
V4 = ("192.0.2.1", 56324), ("198.51.100.2", 443)
V6 = ("2001:db8::1", 65535), ("2001:db8::2", 0)
LOCAL = ("LOCAL", None, None)
NO_ADDRESS = ("PROXY", None, None)

GOOD = [
    # (name, header bytes, expected (command, source, destination))
    ("v1 TCP4", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     ("PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443))),
    ("v1 TCP4 widest", b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     ("PROXY", ("255.255.255.255", 65535), ("255.255.255.255", 65535))),
    ("v1 TCP4 zeros", b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", ("PROXY", ("0.0.0.0", 0), ("10.0.0.1", 0))),
    ("v1 TCP6", b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n",
     ("PROXY", ("2001:db8::1", 56324), ("2001:db8::2", 443))),
    ("v1 TCP6 full form, upper case", b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::1 1 2\r\n",
     ("PROXY", ("2001:db8::1", 1), ("::1", 2))),
    ("v1 TCP6 widest", b"PROXY TCP6 " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8)
     + b" 65535 65535\r\n",
     ("PROXY", (":".join(["ffff"] * 8), 65535), (":".join(["ffff"] * 8), 65535))),
    ("v1 TCP6 IPv4-mapped", b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
     ("PROXY", ("::ffff:192.0.2.1", 1), ("::1", 2))),
    ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n", LOCAL),
    ("v1 UNKNOWN with addresses", b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", LOCAL),
    ("v1 UNKNOWN longest", b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8)
     + b" 65535 65535\r\n", LOCAL),
    ("v1 UNKNOWN anything", b"PROXY UNKNOWN whatever ~!\x00\r\n", LOCAL),
    ("v2 PROXY TCP4", v2(0x21, 0x11, IPV4_BLOCK), ("PROXY",) + V4),
    ("v2 PROXY TCP6", v2(0x21, 0x21, IPV6_BLOCK), ("PROXY",) + V6),
    ("v2 PROXY TCP4 + TLVs", v2(0x21, 0x11, IPV4_BLOCK + tlv(0x01, b"h2") + tlv(0x04, b"") + tlv(0x05, b"id" * 40)),
     ("PROXY",) + V4),
    ("v2 PROXY TCP6 + TLV", v2(0x21, 0x21, IPV6_BLOCK + tlv(0x20, b"\x01" + b"\0" * 4)), ("PROXY",) + V6),
    ("v2 LOCAL empty", v2(0x20, 0x00, b""), LOCAL),
    ("v2 LOCAL with an address block (skipped)", v2(0x20, 0x11, IPV4_BLOCK), LOCAL),
    ("v2 LOCAL family ignored", v2(0x20, 0xFF, b"\x01\x02\x03"), LOCAL),
    ("v2 PROXY UNSPEC", v2(0x21, 0x00, b""), NO_ADDRESS),
    ("v2 PROXY UNSPEC with bytes", v2(0x21, 0x00, b"\x01\x02\x03\x04\x05"), NO_ADDRESS),
    ("v2 PROXY AF_INET, protocol UNSPEC", v2(0x21, 0x10, b"\xff"), NO_ADDRESS),
    ("v2 PROXY UDP4 (no TCP address)", v2(0x21, 0x12, IPV4_BLOCK), NO_ADDRESS),
    ("v2 PROXY UDP6", v2(0x21, 0x22, IPV6_BLOCK + tlv(0x02, b"example.com")), NO_ADDRESS),
    ("v2 PROXY UNIX stream", v2(0x21, 0x31, UNIX_BLOCK), NO_ADDRESS),
    ("v2 PROXY UNIX datagram + TLV", v2(0x21, 0x32, UNIX_BLOCK + tlv(0x04, b"\0\0")), NO_ADDRESS),
    ("v2 longest accepted", v2(0x21, 0x11, IPV4_BLOCK + tlv(0x04, b"\0" * (V2_MAX_LENGTH - 16 - 12 - 3))),
     ("PROXY",) + V4),
]

BAD = [
    # (name, bytes, a word of the error message)
    ("HTTP request", b"GET / HTTP/1.1\r\n\r\n", "not a PROXY"),
    ("TLS ClientHello", b"\x16\x03\x01\x02\x00\x01", "not a PROXY"),
    ("empty line before a request", b"\r\nGET / HTTP/1.1\r\n\r\n", "not a PROXY"),
    ("lower case keyword", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY"),
    ("keyword without space", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY"),
    ("v1 unknown protocol", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    ("v1 UDP4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    ("v1 lower case protocol", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    ("v1 two spaces", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    ("v1 nothing", b"PROXY \r\n", "protocol"),
    ("v1 protocol only", b"PROXY TCP4\r\n", "protocol"),
    ("v1 UNKNOWN glued", b"PROXY UNKNOWNX\r\n", "protocol"),
    ("v1 TCP4 with IPv6", b"PROXY TCP4 ::1 ::1 1 2\r\n", "IPv4"),
    ("v1 TCP6 with IPv4", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "IPv6"),
    ("v1 octet over 255", b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "IPv4"),
    ("v1 leading zero in address", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "IPv4"),
    ("v1 three octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "IPv4"),
    ("v1 bad IPv6", b"PROXY TCP6 2001:db8:::1 ::1 1 2\r\n", "IPv6"),
    ("v1 IPv6 with a zone", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "character"),
    ("v1 host name", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "character"),
    ("v1 port over 65535", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
    ("v1 port with leading zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "port"),
    ("v1 port 00", b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n", "port"),
    ("v1 port too long", b"PROXY TCP4 1.2.3.4 5.6.7.8 000001 2\r\n", "port"),
    ("v1 port hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 1a 2\r\n", "port"),
    ("v1 port missing", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "TCP4|TCP6"),
    ("v1 extra field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "TCP4|TCP6"),
    ("v1 trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "TCP4|TCP6"),
    ("v1 double space inside", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "TCP4|TCP6"),
    ("v1 bare LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nGET", "CRLF"),
    ("v1 bare CR", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rGET", "CRLF"),
    ("v1 CR CR LF", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "CRLF"),
    ("v1 UNKNOWN bare LF", b"PROXY UNKNOWN\n", "CRLF"),
    ("v1 no CRLF in 107 bytes", b"PROXY UNKNOWN " + b"f" * 200 + b"\r\n", "107"),
    ("v1 108-byte line", b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 16 + 1) + b"\r\n", "107"),
    ("v2 bad signature", V2_SIGNATURE[:11] + b"X" + bytes([0x21, 0x11, 0, 12]) + IPV4_BLOCK, "not a PROXY"),
    ("v2 version 1", v2(0x11, 0x11, IPV4_BLOCK), "version 1"),
    ("v2 version 3", v2(0x31, 0x11, IPV4_BLOCK), "version 3"),
    ("v2 command 2", v2(0x22, 0x11, IPV4_BLOCK), "command 2"),
    ("v2 command 15", v2(0x2F, 0x11, IPV4_BLOCK), "command 15"),
    ("v2 family 4", v2(0x21, 0x41, IPV4_BLOCK), "family"),
    ("v2 family 15", v2(0x21, 0xF1, IPV4_BLOCK), "family"),
    ("v2 protocol 3", v2(0x21, 0x13, IPV4_BLOCK), "family"),
    ("v2 TCP4 block too short", v2(0x21, 0x11, IPV4_BLOCK[:11]), "needs 12"),
    ("v2 TCP6 block too short", v2(0x21, 0x21, IPV6_BLOCK[:35]), "needs 36"),
    ("v2 UNIX block too short", v2(0x21, 0x31, UNIX_BLOCK[:215]), "needs 216"),
    ("v2 TLV header cut", v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00"), "inside a TLV"),
    ("v2 TLV value too long", v2(0x21, 0x11, IPV4_BLOCK + tlv(0x01, b"h2")[:-1]), "TLV longer"),
    ("v2 second TLV too long", v2(0x21, 0x21, IPV6_BLOCK + tlv(0x04, b"") + b"\x01\xff\xff"), "TLV longer"),
    ("v2 over the length cap", v2(0x21, 0x11, IPV4_BLOCK, length=V2_MAX_LENGTH - 15), "more than"),
    ("v2 largest length field", v2(0x21, 0x11, IPV4_BLOCK, length=0xFFFF), "more than"),
]

# malformed headers are refused as soon as these many bytes have arrived (no waiting for more)
EARLY = [
    (b"G", "not a PROXY"),
    (b"PROXZ", "not a PROXY"),
    (b"PROXY X", "protocol"),
    (b"PROXY TCP4 1.2.3.4x", "character"),
    (b"PROXY TCP6 ::1\n", "CRLF"),
    (b"PROXY TCP4 1\r2", "CRLF"),
    (b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 14), "107"),
    (b"\r\n\r\n\x00\r\nQUIX", "not a PROXY"),
    (b"\r\r", "not a PROXY"),
    (V2_SIGNATURE + b"\x11", "version"),
    (V2_SIGNATURE + b"\x23", "command"),
    (V2_SIGNATURE + b"\x21\x51", "family"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "more than"),
]


class ParseTest(unittest.TestCase):
    def test_good_headers(self) -> None:
        for name, header, (command, source, destination) in GOOD:
            with self.subTest(name):
                version = 2 if header.startswith(V2_SIGNATURE) else 1
                expected = ProxyHeader(version, command, source, destination)
                self.assertEqual(parse_proxy_header(header), (expected, len(header)))
                # the request bytes after the header are not part of it
                self.assertEqual(parse_proxy_header(header + REQUEST), (expected, len(header)))

    def test_every_strict_prefix_asks_for_more(self) -> None:
        for name, header, _ in GOOD:
            with self.subTest(name):
                for end in range(len(header)):
                    self.assertIsNone(parse_proxy_header(header[:end]), header[:end])

    def test_bad_headers(self) -> None:
        for name, data, words in BAD:
            with self.subTest(name):
                for tail in (b"", REQUEST):
                    with self.assertRaises(ProxyProtocolError) as caught:
                        parse_proxy_header(data + tail)
                    self.assertIn(words, str(caught.exception))

    def test_bad_headers_are_refused_early(self) -> None:
        for data, words in EARLY:
            with self.subTest(data=data):
                with self.assertRaises(ProxyProtocolError) as caught:
                    parse_proxy_header(data)
                self.assertIn(words, str(caught.exception))

    def test_a_bad_header_never_asks_for_more_once_complete(self) -> None:
        # no prefix of a malformed header is ever accepted as a complete header
        for name, data, _ in BAD:
            with self.subTest(name):
                for end in range(len(data)):
                    try:
                        self.assertIsNone(parse_proxy_header(data[:end]))
                    except ProxyProtocolError:
                        break

    def test_error_is_a_value_error(self) -> None:
        self.assertTrue(issubclass(ProxyProtocolError, ValueError))


def tcp_pair(test: unittest.TestCase) -> tuple[socket.socket, socket.socket]:
    """(client, server side) of a real loopback TCP connection, closed at cleanup."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    test.addCleanup(client.close)
    test.addCleanup(server.close)
    return client, server


def unread(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


class ReadFromSocketTest(unittest.TestCase):
    def test_header_then_request_in_one_write(self) -> None:
        for name, header, (command, source, destination) in (GOOD[0], GOOD[7], GOOD[12], GOOD[13], GOOD[15]):
            with self.subTest(name):
                client, server = tcp_pair(self)
                client.sendall(header + REQUEST)
                result = read_proxy_header(server, timeout=5)
                self.assertEqual((result.command, result.source, result.destination), (command, source, destination))
                self.assertIsNone(server.gettimeout())  # blocking again, as it was
                self.assertEqual(recv_exactly(server, len(REQUEST)), REQUEST)

    def test_header_dribbled_one_byte_at_a_time(self) -> None:
        for header in (GOOD[2][1], GOOD[15][1]):  # v1 TCP4 (33 bytes), v2 LOCAL (16 bytes)
            with self.subTest(header=header[:20]):
                client, server = tcp_pair(self)
                results: list[object] = []
                reader = threading.Thread(target=lambda: results.append(read_proxy_header(server, timeout=10)))
                reader.start()
                self.addCleanup(reader.join, 10)
                for index in range(len(header) - 1):
                    client.sendall(header[index:index + 1])
                    deadline = time.monotonic() + 5
                    while unread(server):  # the reader took the byte: it saw the header one byte at a time
                        self.assertLess(time.monotonic(), deadline, "the reader did not consume the byte")
                        time.sleep(0.0005)
                client.sendall(header[-1:] + REQUEST)  # the last byte comes with the request
                reader.join(10)
                self.assertFalse(reader.is_alive())
                self.assertIsInstance(results[0], ProxyHeader)
                self.assertEqual(recv_exactly(server, len(REQUEST)), REQUEST)

    def test_timeout_without_a_complete_header(self) -> None:
        for sent in (b"", b"PROXY TCP4 1.2.", V2_SIGNATURE):
            with self.subTest(sent=sent):
                client, server = tcp_pair(self)
                client.sendall(sent)
                with self.assertRaises(TimeoutError):
                    read_proxy_header(server, timeout=0.02)
                self.assertIsNone(server.gettimeout())

    def test_the_deadline_covers_the_whole_header(self) -> None:
        # a byte every 10 ms keeps each recv busy, but the header is not complete within 0.05 s
        client, server = tcp_pair(self)
        stop = threading.Event()

        def dribble() -> None:
            for byte in GOOD[0][1]:
                if stop.wait(0.01):
                    return
                client.sendall(bytes([byte]))

        writer = threading.Thread(target=dribble)
        writer.start()
        self.addCleanup(writer.join, 5)
        self.addCleanup(stop.set)
        with self.assertRaises(TimeoutError):
            read_proxy_header(server, timeout=0.05)

    def test_malformed_header_and_early_close(self) -> None:
        for sent, close in ((b"GET / HTTP/1.1\r\n\r\n", False), (b"PROXY TCP4 1.2.3.4", True),
                            (v2(0x21, 0x11, IPV4_BLOCK)[:20], True), (b"", True)):
            with self.subTest(sent=sent, close=close):
                client, server = tcp_pair(self)
                client.sendall(sent)
                if close:
                    client.shutdown(socket.SHUT_WR)
                with self.assertRaises(ProxyProtocolError):
                    read_proxy_header(server, timeout=5)
                self.assertIsNone(server.gettimeout())

    def test_restores_a_socket_timeout(self) -> None:
        client, server = tcp_pair(self)
        server.settimeout(7.5)
        client.sendall(GOOD[0][1])
        read_proxy_header(server, timeout=5)
        self.assertEqual(server.gettimeout(), 7.5)


if __name__ == "__main__":
    unittest.main()
