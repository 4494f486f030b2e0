"""The bridge's own queue: FIFO within a client, round-robin across clients, honest positions."""
from __future__ import annotations

import copy
import random

from comfy.fairqueue import FairQueue
from comfy.jobs import Job


def job(client: str, workflow: str = "w") -> Job:
    """A waiting job of a client."""
    return Job(client_id=client, workflow=workflow, inputs={}, prompt={})


def drain(queue: FairQueue) -> list[Job]:
    """Pop everything, in dispatch order."""
    out = []
    while (j := queue.pop()) is not None:
        out.append(j)
    return out


def push_all(queue: FairQueue, *jobs: Job) -> None:
    for j in jobs:
        queue.push(j)


def test_fifo_within_one_client() -> None:
    queue = FairQueue()
    jobs = [job("a") for _ in range(5)]
    push_all(queue, *jobs)
    assert len(queue) == 5
    assert drain(queue) == jobs
    assert len(queue) == 0 and queue.pop() is None


def test_round_robin_across_clients() -> None:
    queue = FairQueue()
    a1, a2, a3, b1, b2, c1 = job("a"), job("a"), job("a"), job("b"), job("b"), job("c")
    push_all(queue, a1, a2, a3, b1, b2, c1)
    assert drain(queue) == [a1, b1, c1, a2, b2, a3]


def test_a_burst_does_not_starve_another_clients_single_job() -> None:
    queue = FairQueue()
    burst = [job("a") for _ in range(100)]
    push_all(queue, *burst)
    single = job("b")
    queue.push(single)
    assert queue.position(single) == 2
    assert drain(queue)[:2] == [burst[0], single]


def test_a_client_arriving_mid_burst_waits_at_most_one_job() -> None:
    queue = FairQueue()
    push_all(queue, *[job("a") for _ in range(100)])
    for _ in range(10):
        queue.pop()
    late = job("b")
    queue.push(late)
    assert queue.position(late) <= 2
    assert late in [queue.pop(), queue.pop()]


def test_a_client_served_last_goes_behind_the_others() -> None:
    queue = FairQueue()
    a1, a2, b1 = job("a"), job("a"), job("b")
    push_all(queue, a1, b1)
    assert queue.pop() is a1
    queue.push(a2)  # a's line was empty: it rejoins behind b
    assert drain(queue) == [b1, a2]


def test_remove_takes_a_waiting_job_out() -> None:
    queue = FairQueue()
    a1, a2, b1, c1 = job("a"), job("a"), job("b"), job("c")
    push_all(queue, a1, a2, b1, c1)
    assert queue.remove(a1) is True
    assert len(queue) == 3
    assert queue.position(a1) is None
    assert queue.remove(a1) is False          # not waiting any more
    assert queue.remove(job("a")) is False    # never queued, same client
    assert queue.remove(job("z")) is False    # never queued, unknown client
    assert queue.remove(b1) is True           # b's only job: b leaves the rotation
    assert queue.position(c1) == 2
    assert drain(queue) == [a2, c1]


def test_push_front_puts_a_retried_job_at_the_head_of_its_clients_line() -> None:
    queue = FairQueue()
    a1, a2, b1 = job("a"), job("a"), job("b")
    push_all(queue, a1, a2, b1)
    retry = job("a")
    queue.push(retry, front=True)
    assert queue.position(retry) == 1
    assert drain(queue) == [retry, b1, a1, a2]


def test_push_front_of_a_new_client_goes_first() -> None:
    queue = FairQueue()
    a1, b1 = job("a"), job("b")
    push_all(queue, a1, b1)
    retry = job("c")
    queue.push(retry, front=True)
    assert queue.position(retry) == 1
    assert drain(queue) == [retry, a1, b1]


def test_pop_with_eligible_skips_clients_whose_next_job_cannot_run_yet() -> None:
    queue = FairQueue()
    a_big, a_small, b1, c1 = job("a", "big"), job("a", "small"), job("b", "small"), job("c", "small")
    push_all(queue, a_big, a_small, b1, c1)
    small_only = lambda j: j.workflow != "big"  # noqa: E731
    assert queue.pop(small_only) is b1
    # a keeps its turn and its order: a_small never overtakes a_big
    assert queue.position(a_big) == 1
    assert queue.pop(small_only) is c1
    assert queue.pop(small_only) is None
    assert len(queue) == 2
    assert drain(queue) == [a_big, a_small]


def test_position_is_none_for_a_job_not_waiting() -> None:
    queue = FairQueue()
    a1 = job("a")
    assert queue.position(a1) is None
    queue.push(a1)
    assert queue.position(job("a")) is None
    assert queue.pop() is a1
    assert queue.position(a1) is None


def assert_positions_match_pop_order(queue: FairQueue) -> None:
    """Every waiting job's position() is where it actually comes out if nothing else changes."""
    positions = {j.id: queue.position(j) for j in queue}
    assert len(positions) == len(queue)
    actual = [j.id for j in drain(copy.deepcopy(queue))]
    assert positions == {jid: i + 1 for i, jid in enumerate(actual)}


def test_position_equals_actual_pop_order_in_a_mixed_scenario() -> None:
    rng = random.Random(20240607)
    queue = FairQueue()
    waiting: list[Job] = []
    for step in range(400):
        op = rng.random()
        if op < 0.55 or not waiting:
            j = job(rng.choice("abcde"))
            queue.push(j, front=rng.random() < 0.1)
            waiting.append(j)
        elif op < 0.8:
            popped = queue.pop()
            assert popped is not None
            waiting.remove(popped)
        elif op < 0.9:
            victim = rng.choice(waiting)
            assert queue.remove(victim)
            waiting.remove(victim)
        else:
            popped = queue.pop(lambda j: j.client_id in "ce")
            if popped is not None:
                assert popped.client_id in "ce"
                waiting.remove(popped)
        assert len(queue) == len(waiting), step
        assert set(map(id, queue)) == set(map(id, waiting)), step
        assert_positions_match_pop_order(queue)
