"""The bridge's own waiting line: round-robin across clients, first-in first-out within a client."""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable, Iterator

from .jobs import Job


class FairQueue:
    """Jobs waiting for a backend; one client's burst never starves another client's single job."""

    def __init__(self) -> None:
        self._clients: OrderedDict[str, deque[Job]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Job]:
        for q in self._clients.values():
            yield from q

    def push(self, job: Job, front: bool = False) -> None:
        """Add a job at the end of its client's line (or at its head, for a job being retried)."""
        q = self._clients.get(job.client_id)
        if q is None:
            q = self._clients[job.client_id] = deque()
            if front:
                self._clients.move_to_end(job.client_id, last=False)
        if front:
            q.appendleft(job)
        else:
            q.append(job)
        self._size += 1

    def pop(self, eligible: Callable[[Job], bool] = lambda job: True) -> Job | None:
        """The next job in round-robin order whose head is eligible; that client goes to the back."""
        for client_id, q in self._clients.items():
            if eligible(q[0]):
                job = q.popleft()
                self._size -= 1
                if q:
                    self._clients.move_to_end(client_id)
                else:
                    del self._clients[client_id]
                return job
        return None

    def remove(self, job: Job) -> bool:
        """Take a waiting job out of the line; False if it was not waiting."""
        q = self._clients.get(job.client_id)
        if q is None or job not in q:
            return False
        q.remove(job)
        self._size -= 1
        if not q:
            del self._clients[job.client_id]
        return True

    def position(self, job: Job) -> int | None:
        """1-based place of a waiting job in dispatch order if nothing else arrives, else None."""
        q = self._clients.get(job.client_id)
        if q is None:
            return None
        try:
            k = q.index(job)
        except ValueError:
            return None
        ahead = 0
        before = True
        for client_id, other in self._clients.items():
            if client_id == job.client_id:
                before = False
                ahead += k
            else:
                # in each of rounds 0..k the clients before ours go first; after ours only rounds 0..k-1
                ahead += min(len(other), k + 1 if before else k)
        return ahead + 1

    def positions(self) -> dict[str, int]:
        """Every waiting job's 1-based place in dispatch order, in one pass (the same numbers as position())."""
        out: dict[str, int] = {}
        lines = list(self._clients.values())
        place, rnd = 0, 0
        while lines:
            for q in lines:
                place += 1
                out[q[rnd].id] = place
            rnd += 1
            lines = [q for q in lines if len(q) > rnd]
        return out
