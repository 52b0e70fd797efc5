"""Unit tests for socket_io: SocketReader and SocketWriter over ``socket.socketpair()``.

In-process, no threads: what the reader receives is controlled by sending on
the peer before reading, and ``fill()`` (one ``recv``) is called by hand where
a test needs the bytes to arrive in several pieces.
"""

from __future__ import annotations

import socket
import sys
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from socket_io import RECV_SIZE, SocketReader, SocketWriter, set_timeouts  # noqa: E402


class SocketCase(unittest.TestCase):
    def setUp(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)
        set_timeouts(self.ours, 5)  # a bug must fail the test, not hang it
        self.reader = SocketReader(self.ours)

    def arrive(self, *pieces: bytes) -> None:
        """Make ``pieces`` arrive in the reader's buffer one ``recv`` each."""
        for piece in pieces:
            self.peer.sendall(piece)
            before = self.reader.buffered
            self.assertTrue(self.reader.fill())
            self.assertEqual(self.reader.buffered, before + len(piece))

    def end(self) -> None:
        """The peer stops sending."""
        self.peer.shutdown(socket.SHUT_WR)


class ReadlineTest(SocketCase):
    def test_lines_without_limit(self) -> None:
        self.peer.sendall(b"ab\ncd\r\nlast")
        self.end()
        self.assertEqual(self.reader.readline(), b"ab\n")
        self.assertEqual(self.reader.readline(), b"cd\r\n")
        self.assertEqual(self.reader.readline(), b"last")  # end of stream, no LF
        self.assertEqual(self.reader.readline(), b"")

    def test_line_split_across_receives(self) -> None:
        self.arrive(b"GET / HT", b"TP/1.1\r", b"\nrest")
        self.assertEqual(self.reader.readline(), b"GET / HTTP/1.1\r\n")
        self.assertEqual(self.reader.buffered, 4)

    def test_line_completed_by_a_later_receive(self) -> None:
        self.arrive(b"abc")
        self.peer.sendall(b"def\nxyz")
        self.assertEqual(self.reader.readline(), b"abcdef\n")
        self.assertEqual(self.reader.read(3), b"xyz")

    def test_limit(self) -> None:
        cases = [  # (data, limit, first readline, what remains buffered)
            (b"abcdef\n", 3, b"abc", b"def\n"),
            (b"ab\ncd\n", 3, b"ab\n", b"cd\n"),  # the LF fits exactly
            (b"abc\n", 3, b"abc", b"\n"),  # the LF is one byte too far
            (b"abc\n", 100, b"abc\n", b""),
            (b"abc\n", 0, b"", b"abc\n"),
        ]
        for data, limit, line, rest in cases:
            with self.subTest(data=data, limit=limit):
                reader = SocketReader(self.ours)
                self.peer.sendall(data)
                self.assertEqual(reader.readline(limit), line)
                self.assertEqual(reader.read(len(rest)), rest)
                self.assertEqual(reader.buffered, 0)

    def test_limit_waits_for_enough_bytes(self) -> None:
        self.arrive(b"ab")
        self.peer.sendall(b"cdef")
        self.assertEqual(self.reader.readline(4), b"abcd")

    def test_limit_at_end_of_stream(self) -> None:
        self.peer.sendall(b"ab")
        self.end()
        self.assertEqual(self.reader.readline(10), b"ab")
        self.assertEqual(self.reader.readline(10), b"")


class ReadTest(SocketCase):
    def test_read_exactly_n_across_receives(self) -> None:
        self.arrive(b"abc")
        self.peer.sendall(b"defgh")
        self.assertEqual(self.reader.read(6), b"abcdef")
        self.assertEqual(self.reader.buffered, 2)
        self.assertEqual(self.reader.read(2), b"gh")

    def test_read_returns_fewer_at_end_of_stream(self) -> None:
        self.peer.sendall(b"abc")
        self.end()
        self.assertEqual(self.reader.read(10), b"abc")
        self.assertEqual(self.reader.read(10), b"")
        self.assertEqual(self.reader.read(0), b"")

    def test_read1_returns_what_is_buffered_without_receiving(self) -> None:
        self.arrive(b"abcdef")
        self.peer.sendall(b"more")  # must not be received by read1 while bytes are buffered
        self.assertEqual(self.reader.read1(4), b"abcd")
        self.assertEqual(self.reader.read1(100), b"ef")
        self.assertEqual(self.reader.read1(100), b"more")  # one receive

    def test_read1_large_reads_straight_from_the_socket(self) -> None:
        self.peer.sendall(b"x" * 1000)
        self.assertEqual(self.reader.read1(RECV_SIZE), b"x" * 1000)
        self.assertEqual(self.reader.buffered, 0)

    def test_read1_at_end_of_stream(self) -> None:
        self.end()
        self.assertEqual(self.reader.read1(10), b"")
        self.assertEqual(self.reader.read1(RECV_SIZE), b"")

    def test_peek_does_not_consume(self) -> None:
        self.peer.sendall(b"GET")
        self.assertEqual(self.reader.peek(1), b"GET")
        self.assertEqual(self.reader.buffered, 3)
        self.assertEqual(self.reader.peek(1), b"GET")  # no second receive needed
        self.assertEqual(self.reader.read(3), b"GET")
        self.assertEqual(self.reader.buffered, 0)

    def test_peek_at_end_of_stream(self) -> None:
        self.end()
        self.assertEqual(self.reader.peek(1), b"")

    def test_close_drops_the_buffer(self) -> None:
        self.arrive(b"abc")
        self.reader.close()
        self.assertEqual(self.reader.buffered, 0)


class TimeoutTest(SocketCase):
    """A kernel timeout (SO_RCVTIMEO / SO_SNDTIMEO) surfaces as TimeoutError."""

    def test_reads_time_out(self) -> None:
        set_timeouts(self.ours, 0.05)
        self.assertIsNone(self.ours.gettimeout())  # blocking mode: the kernel times out
        reads = {"readline": lambda: self.reader.readline(),
                 "read": lambda: self.reader.read(1),
                 "read1": lambda: self.reader.read1(10),
                 "read1 large": lambda: self.reader.read1(RECV_SIZE),
                 "peek": lambda: self.reader.peek(1),
                 "read_head": lambda: self.reader.read_head(100)}
        for name, read in reads.items():
            with self.subTest(name):
                with self.assertRaises(TimeoutError):
                    read()

    def test_bytes_received_before_a_timeout_are_kept(self) -> None:
        set_timeouts(self.ours, 0.05)
        self.peer.sendall(b"partial li")
        with self.assertRaises(TimeoutError):
            self.reader.readline()
        self.peer.sendall(b"ne\n")
        self.assertEqual(self.reader.readline(), b"partial line\n")

    def test_write_times_out_when_the_peer_stops_reading(self) -> None:
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        set_timeouts(self.ours, 0.05)
        writer = SocketWriter(self.ours)
        with self.assertRaises(TimeoutError):
            writer.write(b"x" * (8 * 1024 * 1024))


class ReadHeadTest(SocketCase):
    """``read_head``: the field lines up to and including the empty line, in one search."""

    HEAD = b"Host: a\r\nX-Long: " + b"v" * 50 + b"\r\n\r\n"

    def test_head_in_one_segment(self) -> None:
        self.peer.sendall(self.HEAD + b"body")
        self.assertEqual(self.reader.read_head(1000), self.HEAD)
        self.assertEqual(self.reader.buffered, 4)
        self.assertEqual(self.reader.read(4), b"body")

    def test_head_split_across_sends(self) -> None:
        head = self.HEAD
        splits = {  # every way of cutting inside the final CRLF CRLF, and elsewhere
            "in a line": [head[:5], head[5:]],
            "after CR": [head[:-3], head[-3:]],
            "after CRLF": [head[:-2], head[-2:]],
            "after CRLF CR": [head[:-1], head[-1:]],
            "byte by byte at the end": [head[:-4], b"\r", b"\n", b"\r", b"\n"],
            "many pieces": [head[i:i + 7] for i in range(0, len(head), 7)],
        }
        for name, pieces in splits.items():
            with self.subTest(name):
                reader = self.reader = SocketReader(self.ours)
                self.arrive(*pieces[:-1])
                self.peer.sendall(pieces[-1] + b"next")
                self.assertEqual(reader.read_head(1000), head)
                self.assertEqual(reader.read(4), b"next")

    def test_no_fields_at_all(self) -> None:
        for name, pieces in {"whole": [b"\r\n"], "split": [b"\r", b"\n"]}.items():
            with self.subTest(name):
                reader = self.reader = SocketReader(self.ours)
                self.arrive(*pieces[:-1])
                self.peer.sendall(pieces[-1] + b"body")
                self.assertEqual(reader.read_head(1000), b"\r\n")
                self.assertEqual(reader.read(4), b"body")

    def test_blank_line_inside_a_field_line_does_not_end_the_head(self) -> None:
        # Only CRLF CRLF ends it; a lone LF pair is left for the field parser to reject.
        self.peer.sendall(b"A: 1\n\nB: 2\r\n\r\n")
        self.assertEqual(self.reader.read_head(1000), b"A: 1\n\nB: 2\r\n\r\n")

    def test_oversize_head_is_cut_after_max_bytes_plus_one(self) -> None:
        self.peer.sendall(b"X: " + b"v" * 100)  # no end in sight
        block = self.reader.read_head(10)
        self.assertEqual(block, (b"X: " + b"v" * 100)[:11])
        self.assertGreater(len(block), 10)
        self.assertFalse(block.endswith(b"\r\n\r\n"))

    def test_oversize_head_arriving_in_pieces(self) -> None:
        self.arrive(b"X: vvvv", b"vvvv")
        self.peer.sendall(b"vvvvvvvv\r\n\r\n")
        self.assertGreater(len(self.reader.read_head(10)), 10)

    def test_stream_ending_mid_head(self) -> None:
        for name, data in {"mid line": b"Host: a\r\nX-Y", "after CRLF": b"Host: a\r\n",
                           "after CRLF CR": b"Host: a\r\n\r", "nothing": b""}.items():
            with self.subTest(name):
                ours, peer = socket.socketpair()
                self.addCleanup(ours.close)
                self.addCleanup(peer.close)
                set_timeouts(ours, 5)
                reader = SocketReader(ours)
                peer.sendall(data)
                peer.shutdown(socket.SHUT_WR)
                self.assertEqual(reader.read_head(1000), data)  # unterminated: the caller's 400
                self.assertEqual(reader.read_head(1000), b"")


class SocketWriterTest(SocketCase):
    def test_write_sends_everything(self) -> None:
        writer = SocketWriter(self.ours)
        data = bytes(range(256)) * 40  # fits in the socket buffers: nobody reads yet
        self.assertEqual(writer.write(data), len(data))
        self.ours.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := self.peer.recv(65536):
            received += chunk
        self.assertEqual(bytes(received), data)

    def test_write_to_a_closed_peer_raises_oserror(self) -> None:
        writer = SocketWriter(self.ours)
        self.peer.close()
        with self.assertRaises(OSError):
            for _ in range(100):  # the first write may still be accepted locally
                writer.write(b"x" * 65536)


if __name__ == "__main__":
    unittest.main()
