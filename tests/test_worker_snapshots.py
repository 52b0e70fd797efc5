"""--workers state snapshots: self-delimiting lines, so a torn one costs only itself.

The supervisor writes snapshots into each worker's stdin pipe without ever
blocking; a full pipe can cut one short.  These tests use a real pipe made
full on purpose.
"""

from __future__ import annotations

import errno
import os
import unittest

import workers
from workers import SnapshotReader, decode_snapshot, encode_snapshot, write_snapshot


def rows(count: int, state: str = "up") -> list[list]:
    return [[f"http://10.0.{i // 250}.{i % 250 + 1}:8080", 1 + i % 3, state, "ready"]
            for i in range(count)]


class PipeCase(unittest.TestCase):

    def pipe(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        self.addCleanup(os.close, write_fd)
        os.set_blocking(write_fd, False)
        os.set_blocking(read_fd, False)
        return read_fd, write_fd

    @staticmethod
    def fill(write_fd: int) -> None:
        """Fill the pipe with bytes a worker skips (empty lines)."""
        while True:
            try:
                os.write(write_fd, b"\n" * 4096)
            except BlockingIOError:
                try:
                    os.write(write_fd, b"\n")  # the last partial page
                except BlockingIOError:
                    return

    @staticmethod
    def drain(read_fd: int) -> bytes:
        data = bytearray()
        while True:
            try:
                piece = os.read(read_fd, 1 << 16)
            except BlockingIOError:
                return bytes(data)
            if not piece:
                return bytes(data)
            data += piece


class SnapshotFramingTests(PipeCase):

    def test_round_trip(self) -> None:
        snapshot = rows(3)
        line = encode_snapshot(snapshot)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(SnapshotReader().feed(line), [snapshot])
        self.assertEqual(decode_snapshot(line[:-1]), snapshot)

    def test_torn_or_malformed_lines_are_rejected(self) -> None:
        line = encode_snapshot(rows(2))[:-1]
        for bad in (line[:-1], line[:5], b"", b"12", b"x " + line, b"2 []x", b"7 [1,2,3]",
                    b'13 [["a",1,"up"]]'):
            with self.subTest(bad=bad):
                self.assertIsNone(decode_snapshot(bad))

    def test_a_line_arriving_in_pieces_is_decoded_once_whole(self) -> None:
        line = encode_snapshot(rows(40))
        reader = SnapshotReader()
        got = []
        for start in range(0, len(line), 7):
            got += reader.feed(line[start:start + 7])
        self.assertEqual(got, [rows(40)])

    def test_a_snapshot_torn_by_a_full_pipe_costs_only_itself(self) -> None:
        """Regression: the torn start of one snapshot used to be glued to the next
        one (no separator), so both were lost.  Now the next write ends the torn
        line first: the worker drops the torn one and reads the next one whole."""
        read_fd, write_fd = self.pipe()
        first, second = rows(400, "up"), rows(400, "down")  # each well over PIPE_BUF
        self.fill(write_fd)
        os.read(read_fd, 4096 + 100)  # room for about a page: the snapshot is cut after it
        torn = write_snapshot(write_fd, encode_snapshot(first), torn=False)
        self.assertTrue(torn, "the snapshot was expected to be cut short")
        received = self.drain(read_fd)  # the worker catches up
        torn = write_snapshot(write_fd, encode_snapshot(second), torn)
        self.assertFalse(torn)
        received += self.drain(read_fd)
        snapshots = SnapshotReader().feed(bytes(received))
        self.assertEqual(snapshots, [second])

    def test_a_pipe_with_no_room_takes_nothing_and_keeps_the_torn_state(self) -> None:
        read_fd, write_fd = self.pipe()
        self.fill(write_fd)
        for torn in (False, True):
            with self.subTest(torn=torn):
                self.assertEqual(write_snapshot(write_fd, encode_snapshot(rows(1)), torn), torn)

    def test_a_closed_pipe_raises_for_the_caller_to_ignore(self) -> None:
        read_fd, write_fd = os.pipe()
        os.close(read_fd)
        self.addCleanup(os.close, write_fd)
        with self.assertRaises(OSError) as caught:
            write_snapshot(write_fd, encode_snapshot(rows(1)), False)
        self.assertEqual(caught.exception.errno, errno.EPIPE)


class CounterReportTests(unittest.TestCase):

    def test_reports_add_up_and_round_trip(self) -> None:
        from metrics import Histogram, TrafficCounters
        one = workers.CounterReport({"http://a:1": TrafficCounters({200: 2}, 1, 1, 0, Histogram())},
                                    {503: 1})
        one.backends["http://a:1"].latency.observe(0.003)
        two = workers.CounterReport.decode(one.encode())
        self.assertEqual(two, one)
        total = workers.CounterReport()
        total.add(one)
        total.add(two, in_flight=False)
        traffic = total.backends["http://a:1"]
        self.assertEqual((traffic.responses, traffic.in_flight, traffic.failures),
                         ({200: 4}, 1, 2))
        self.assertEqual(traffic.latency.count, 2)
        self.assertEqual(total.unrouted, {503: 2})
        for bad in (b"{}", b"[]", b'{"backends": {"x": {}}, "unrouted": {}}', b"nonsense"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                workers.CounterReport.decode(bad)


if __name__ == "__main__":
    unittest.main()
