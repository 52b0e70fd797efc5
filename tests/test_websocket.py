"""websocket.py (RFC 6455 codec, table tests) and server.py's /ws echo route (a real child process)."""

from __future__ import annotations

import base64
import struct
import unittest

import websocket
from tests.support import DemoServer, connect, read_head
from websocket import CloseCode, ConnectionClosed, Frame, Message, MessageAssembler, Opcode, ProtocolError

MASK = b"\x37\xfa\x21\x3d"  # RFC 6455 5.7's example key


class HandshakeTest(unittest.TestCase):
    def test_accept_key_rfc_example(self) -> None:
        # RFC 6455 1.3 / 4.2.2: the sample nonce and its accept value.
        self.assertEqual(websocket.accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_new_key_is_16_random_bytes(self) -> None:
        self.assertEqual(len(base64.b64decode(websocket.new_key())), 16)
        self.assertNotEqual(websocket.new_key(), websocket.new_key())

    def test_problems(self) -> None:
        good = {"upgrade": "websocket", "connection": "keep-alive, Upgrade",
                "sec-websocket-version": "13", "sec-websocket-key": websocket.new_key()}
        table = [
            ("GET", {}, None),
            ("POST", {}, 405),
            ("GET", {"upgrade": "h2c"}, 426),
            ("GET", {"connection": "close"}, 426),
            ("GET", {"sec-websocket-version": "8"}, 426),
            ("GET", {"sec-websocket-key": "short"}, 400),
            ("GET", {"sec-websocket-key": base64.b64encode(b"x" * 15).decode()}, 400),
        ]
        for method, change, status in table:
            with self.subTest(method=method, change=change):
                problem = websocket.handshake_problem(method, {**good, **change})
                self.assertEqual(problem and problem[0], status)


class FrameCodecTest(unittest.TestCase):
    def test_encode_rfc_examples(self) -> None:
        # RFC 6455 5.7
        table = [
            ((Opcode.TEXT, b"Hello"), {}, bytes.fromhex("810548656c6c6f")),
            ((Opcode.TEXT, b"Hello"), {"mask": MASK}, bytes.fromhex("818537fa213d7f9f4d5158")),
            ((Opcode.TEXT, b"Hel"), {"fin": False}, bytes.fromhex("010348656c")),
            ((Opcode.CONTINUATION, b"lo"), {}, bytes.fromhex("80026c6f")),
            ((Opcode.PING, b"Hello"), {}, bytes.fromhex("890548656c6c6f")),
            ((Opcode.PONG, b"Hello"), {"mask": MASK}, bytes.fromhex("8a8537fa213d7f9f4d5158")),
            ((Opcode.BINARY, b"\0" * 256), {}, bytes.fromhex("827e0100") + b"\0" * 256),
            ((Opcode.BINARY, b"\0" * 65536), {}, bytes.fromhex("827f0000000000010000") + b"\0" * 65536),
            ((Opcode.BINARY, b"\0" * 125), {}, bytes.fromhex("827d") + b"\0" * 125),
            ((Opcode.BINARY, b"\0" * 126), {}, bytes.fromhex("827e007e") + b"\0" * 126),
            ((Opcode.BINARY, b"\0" * 65535), {}, bytes.fromhex("827effff") + b"\0" * 65535),
        ]
        for args, kwargs, wire in table:
            with self.subTest(args=(args[0], len(args[1])), kwargs=kwargs):
                self.assertEqual(websocket.encode_frame(*args, **kwargs), wire)
                frame, used = websocket.decode_frame(wire)  # type: ignore[misc]
                self.assertEqual((frame, used), (Frame(args[0], args[1], kwargs.get("fin", True)), len(wire)))

    def test_masking(self) -> None:
        self.assertEqual(websocket.apply_mask(b"Hello", MASK), bytes.fromhex("7f9f4d5158"))
        data = bytes(range(256)) * 3 + b"xy"
        self.assertEqual(websocket.apply_mask(websocket.apply_mask(data, MASK), MASK), data)
        self.assertEqual(websocket.apply_mask(b"", MASK), b"")
        self.assertEqual(websocket.apply_mask(b"\0\0", MASK), MASK[:2])  # leading zero bytes kept
        random_masked = websocket.encode_frame(Opcode.BINARY, data, mask=True)
        self.assertEqual(websocket.decode_frame(random_masked, require_mask=True)[0].payload, data)  # type: ignore[index]
        with self.assertRaises(ValueError):
            websocket.apply_mask(b"x", b"abc")

    def test_incomplete_frames_need_more(self) -> None:
        wire = websocket.encode_frame(Opcode.BINARY, b"z" * 70000, mask=MASK)
        for cut in (0, 1, 2, 5, 9, 13, 14, len(wire) - 1):
            with self.subTest(cut=cut):
                self.assertIsNone(websocket.decode_frame(wire[:cut]))
        frame, used = websocket.decode_frame(wire + b"\x81\x00")  # type: ignore[misc]
        self.assertEqual((len(frame.payload), used), (70000, len(wire)))

    def test_protocol_errors(self) -> None:
        table = [
            (b"\xc1\x00", None, "reserved bits", CloseCode.PROTOCOL_ERROR),
            (b"\x83\x00", None, "reserved opcode 0x3", CloseCode.PROTOCOL_ERROR),
            (b"\x8b\x00", None, "reserved opcode 0xb", CloseCode.PROTOCOL_ERROR),
            (b"\x81\x00", True, "client frames must be masked", CloseCode.PROTOCOL_ERROR),
            (b"\x81\x80" + MASK, False, "server frames must not be masked", CloseCode.PROTOCOL_ERROR),
            (b"\x09\x00", None, "control frames must be final", CloseCode.PROTOCOL_ERROR),
            (b"\x89\x7e\x00\x7e", None, "control frames", CloseCode.PROTOCOL_ERROR),
            (b"\x82\x7e\x00\x05", None, "not minimally encoded", CloseCode.PROTOCOL_ERROR),
            (b"\x82\x7f" + struct.pack("!Q", 300), None, "not minimally encoded", CloseCode.PROTOCOL_ERROR),
            (b"\x82\x7f" + struct.pack("!Q", 1 << 63), None, "most significant bit", CloseCode.PROTOCOL_ERROR),
            (b"\x82\x7f" + struct.pack("!Q", 1 << 40), None, "over the limit", CloseCode.MESSAGE_TOO_BIG),
        ]
        for wire, require_mask, text, code in table:
            with self.subTest(wire=wire), self.assertRaises(ProtocolError) as caught:
                websocket.decode_frame(wire, require_mask=require_mask)
            self.assertIn(text, str(caught.exception))
            self.assertEqual(caught.exception.code, code)

    def test_control_frames_cannot_be_built_wrong(self) -> None:
        for kwargs in ({"fin": False}, {}):
            payload = b"x" * (126 if not kwargs else 1)
            with self.subTest(kwargs=kwargs), self.assertRaises(ValueError):
                websocket.encode_frame(Opcode.PING, payload, **kwargs)

    def test_read_frame_from_a_stream(self) -> None:
        wire = (websocket.encode_frame(Opcode.TEXT, b"hi", mask=MASK)
                + websocket.encode_frame(Opcode.BINARY, b"b" * 300, mask=MASK))
        stream = _Stream(wire)
        self.assertEqual(websocket.read_frame(stream.read, require_mask=True), Frame(Opcode.TEXT, b"hi"))
        self.assertEqual(websocket.read_frame(stream.read, require_mask=True).payload, b"b" * 300)
        with self.assertRaisesRegex(ConnectionClosed, "end of stream"):
            websocket.read_frame(stream.read)
        with self.assertRaisesRegex(ConnectionClosed, "inside a frame"):
            websocket.read_frame(_Stream(wire[:5]).read)


class _Stream:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int) -> bytes:
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


class CloseAndMessagesTest(unittest.TestCase):
    def test_close_payloads(self) -> None:
        self.assertEqual(websocket.encode_close(1000), b"\x03\xe8")
        self.assertEqual(websocket.encode_close(4000, "bye"), b"\x0f\xa0bye")
        self.assertEqual(websocket.encode_close(None), b"")
        self.assertEqual(websocket.parse_close(b""), (1005, ""))
        self.assertEqual(websocket.parse_close(b"\x03\xe9gone"), (1001, "gone"))
        for code in (999, 1004, 1005, 1006, 1015, 2999, 5000):
            with self.subTest(code=code):
                with self.assertRaises(ValueError):
                    websocket.encode_close(code)
                with self.assertRaises(ProtocolError) as caught:
                    websocket.parse_close(struct.pack("!H", code))
                self.assertEqual(caught.exception.code, CloseCode.PROTOCOL_ERROR)
        with self.assertRaises(ProtocolError):
            websocket.parse_close(b"\x03")
        with self.assertRaises(ProtocolError) as caught:
            websocket.parse_close(b"\x03\xe8\xff")
        self.assertEqual(caught.exception.code, CloseCode.INVALID_DATA)
        with self.assertRaises(ValueError):
            websocket.encode_close(1000, "x" * 124)

    def test_fragmentation_with_control_frames_between(self) -> None:
        assembler = MessageAssembler()
        steps = [
            (Frame(Opcode.TEXT, b"Hel", fin=False), None),
            (Frame(Opcode.PING, b"p"), Message(Opcode.PING, b"p")),
            (Frame(Opcode.CONTINUATION, b"lo ", fin=False), None),
            (Frame(Opcode.CONTINUATION, "wörld".encode()), Message(Opcode.TEXT, "Hello wörld".encode())),
            (Frame(Opcode.BINARY, b"\xff"), Message(Opcode.BINARY, b"\xff")),
            (Frame(Opcode.CLOSE, b""), Message(Opcode.CLOSE, b"")),
        ]
        for frame, expected in steps:
            self.assertEqual(assembler.feed(frame), expected)

    def test_utf8_split_across_fragments_is_fine(self) -> None:
        text = "é".encode()
        assembler = MessageAssembler()
        self.assertIsNone(assembler.feed(Frame(Opcode.TEXT, text[:1], fin=False)))
        self.assertEqual(assembler.feed(Frame(Opcode.CONTINUATION, text[1:])), Message(Opcode.TEXT, text))

    def test_sequence_errors(self) -> None:
        table = [
            ([Frame(Opcode.CONTINUATION, b"x")], CloseCode.PROTOCOL_ERROR),
            ([Frame(Opcode.TEXT, b"a", fin=False), Frame(Opcode.BINARY, b"b")], CloseCode.PROTOCOL_ERROR),
            ([Frame(Opcode.TEXT, b"\xff")], CloseCode.INVALID_DATA),
            ([Frame(Opcode.BINARY, b"x" * 6, fin=False), Frame(Opcode.CONTINUATION, b"x" * 6)], CloseCode.MESSAGE_TOO_BIG),
        ]
        for frames, code in table:
            assembler = MessageAssembler(max_message=10)
            with self.subTest(frames=frames), self.assertRaises(ProtocolError) as caught:
                for frame in frames:
                    assembler.feed(frame)
            self.assertEqual(caught.exception.code, code)


class WebSocketClient:
    """A minimal RFC 6455 client over a socket, for the /ws tests."""

    def __init__(self, port: int, key: str | None = None, extra: str = "") -> None:
        self.sock = connect(port, timeout=5)
        self.reader = self.sock.makefile("rb")
        self.key = key or websocket.new_key()
        self.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        self.response = read_head(self.reader)

    def send(self, opcode: Opcode, payload: bytes = b"", fin: bool = True) -> None:
        self.sock.sendall(websocket.encode_frame(opcode, payload, fin=fin, mask=True))

    def receive(self) -> Frame:
        return websocket.read_frame(self.reader.read, require_mask=False)

    def closed(self) -> bool:
        return self.reader.read(1) == b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class DemoWebSocketTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.server = DemoServer(name="ws-backend")
        cls.addClassCleanup(cls.server.stop)

    def client(self) -> WebSocketClient:
        client = WebSocketClient(self.server.port)
        self.addCleanup(client.close)
        self.assertEqual(client.response.status, 101, client.response.raw_head)
        return client

    def test_handshake_and_echo(self) -> None:
        client = self.client()
        self.assertEqual(client.response.header("Sec-WebSocket-Accept"), websocket.accept_key(client.key))
        self.assertEqual(client.response.header("Upgrade").lower(), "websocket")  # type: ignore[union-attr]
        self.assertEqual(client.response.header("X-Backend-Server"), "ws-backend")
        client.send(Opcode.TEXT, "héllo".encode())
        self.assertEqual(client.receive(), Frame(Opcode.TEXT, "héllo".encode()))
        client.send(Opcode.BINARY, bytes(range(256)) * 400)  # 100 KiB: 64-bit length
        self.assertEqual(client.receive(), Frame(Opcode.BINARY, bytes(range(256)) * 400))

    def test_fragmented_message_with_ping_between(self) -> None:
        client = self.client()
        client.send(Opcode.BINARY, b"one ", fin=False)
        client.send(Opcode.PING, b"are you there")
        self.assertEqual(client.receive(), Frame(Opcode.PONG, b"are you there"))  # before the message ends
        client.send(Opcode.CONTINUATION, b"two ", fin=False)
        client.send(Opcode.PONG, b"unsolicited")  # ignored (RFC 6455 5.5.3)
        client.send(Opcode.CONTINUATION, b"three")
        self.assertEqual(client.receive(), Frame(Opcode.BINARY, b"one two three"))

    def test_close_handshake(self) -> None:
        client = self.client()
        client.send(Opcode.CLOSE, websocket.encode_close(4001, "done"))
        reply = client.receive()
        self.assertEqual(reply.opcode, Opcode.CLOSE)
        self.assertEqual(websocket.parse_close(reply.payload), (4001, ""))
        self.assertTrue(client.closed())  # the server closes the TCP connection first (7.1.1)

    def test_protocol_errors_close_with_their_code(self) -> None:
        table = [
            (lambda c: c.sock.sendall(websocket.encode_frame(Opcode.TEXT, b"x")), CloseCode.PROTOCOL_ERROR),  # unmasked
            (lambda c: c.send(Opcode.TEXT, b"\xc3\x28"), CloseCode.INVALID_DATA),
            (lambda c: c.send(Opcode.CONTINUATION, b"x"), CloseCode.PROTOCOL_ERROR),
        ]
        for act, code in table:
            with self.subTest(code=code):
                client = self.client()
                act(client)
                reply = client.receive()
                self.assertEqual((reply.opcode, websocket.parse_close(reply.payload)[0]), (Opcode.CLOSE, code))
                self.assertTrue(client.closed())

    def test_bad_handshakes_and_plain_requests(self) -> None:
        client = WebSocketClient(self.server.port, key="not-a-key")
        self.addCleanup(client.close)
        self.assertEqual(client.response.status, 400)
        with connect(self.server.port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
            response = read_head(reader)
            self.assertEqual((response.status, response.header("Sec-WebSocket-Version")), (426, "13"))
        with connect(self.server.port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            refused = read_head(reader)
            self.assertEqual(refused.status, 426)
            reader.read(int(refused.header("Content-Length") or 0))
            self.assertEqual(read_head(reader).status, 200)  # the connection stays usable
        # The ordinary routes are untouched.
        with connect(self.server.port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            sock.settimeout(5)
            self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 200 OK"))


if __name__ == "__main__":
    unittest.main()
