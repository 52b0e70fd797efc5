"""Load-balancing policies: which backend gets the next request.

Every policy is a small object with one method, ``select(backends, client)``,
called by ``ServerCluster`` while it holds its lock, with only the backends
that may take traffic right now (never an empty list).  A policy may keep its
own state (a counter, current weights); the cluster lock guards it, so a
policy needs no lock of its own.  Adding a policy means adding a class here
and a name in ``POLICIES``; the proxy code does not change.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from cluster import Backend


class Policy(Protocol):
    name: str

    def select(self, backends: Sequence[Backend], client: str) -> Backend:
        """Pick one of ``backends`` (non-empty) for a request from ``client``."""
        ...


class RoundRobin:
    """Request i goes to backend i mod n among those available."""

    name = "round-robin"

    def __init__(self) -> None:
        self.counter = 0

    def select(self, backends: Sequence[Backend], client: str) -> Backend:
        backend = backends[self.counter % len(backends)]
        self.counter += 1
        return backend


class WeightedRoundRobin:
    """nginx's smooth weighted round robin: 5:1:1 gives a a b a c a a."""

    name = "weighted-round-robin"

    def __init__(self) -> None:
        self.current: dict[int, float] = {}  # backend id -> current weight

    def select(self, backends: Sequence[Backend], client: str) -> Backend:
        total = 0.0
        best: Backend | None = None
        for backend in backends:
            weight = backend.effective_weight()
            total += weight
            current = self.current.get(backend.id, 0.0) + weight
            self.current[backend.id] = current
            if best is None or current > self.current[best.id]:
                best = backend
        assert best is not None
        self.current[best.id] -= total
        return best


class LeastConnections:
    """Fewest in-flight requests per unit of weight; ties go round robin."""

    name = "least-connections"

    def __init__(self) -> None:
        self.counter = 0

    def select(self, backends: Sequence[Backend], client: str) -> Backend:
        loads = [backend.in_flight / backend.effective_weight() for backend in backends]
        lowest = min(loads)
        tied = [b for b, load in zip(backends, loads) if load == lowest]
        backend = tied[self.counter % len(tied)]
        self.counter += 1
        return backend


class RandomTwo:
    """Power of two random choices: the less loaded of two random backends."""

    name = "random-two"

    def __init__(self, seed: int | None = None) -> None:
        self.random = random.Random(seed)

    def select(self, backends: Sequence[Backend], client: str) -> Backend:
        if len(backends) == 1:
            return backends[0]
        first, second = self.random.sample(list(backends), 2)
        if second.in_flight / second.effective_weight() < first.in_flight / first.effective_weight():
            return second
        return first


class IPHash:
    """Rendezvous (highest random weight) hashing on the client address.

    Each (client, backend) pair gets a pseudo-random score; the client goes to
    the highest.  Removing a backend only moves the clients that were on it.
    Weighted with the logarithmic method so weights keep their proportions.
    """

    name = "ip-hash"

    def select(self, backends: Sequence[Backend], client: str) -> Backend:
        def score(backend: Backend) -> float:
            digest = hashlib.blake2b(f"{client}|{backend.url}".encode(), digest_size=8).digest()
            unit = (int.from_bytes(digest, "big") + 1) / (2 ** 64 + 2)  # in (0, 1)
            return -backend.weight / math.log(unit)
        return max(backends, key=score)


POLICIES: dict[str, type] = {
    policy.name: policy
    for policy in (RoundRobin, WeightedRoundRobin, LeastConnections, RandomTwo, IPHash)
}


def make_policy(name: str) -> Policy:
    """A new policy object for ``name`` (one of ``POLICIES``)."""
    return POLICIES[name]()
