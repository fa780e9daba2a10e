"""The per-process call bound, the publishing thread and the consumer's ticket count: plain
in-process logic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from triage.errors import CallNotStarted
from triage.pipeline.consumption import held_tickets
from triage.pipeline.fanout import CallGate, CallPool, CallSlots, HeldSlots, claim_ahead
from triage.pipeline.publishing import MARK_DELAY_SECONDS, Backlog, PublishBatcher
from triage.pipeline.relay import CLASSIFY_TASK, DELIVER_TASK


def test_slots_hand_out_what_is_free_up_to_the_wish():
    slots = CallSlots(5)
    assert slots.take(3) == 3
    assert slots.take(10) == 2  # only two left
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(slots.take(4)))
    waiter.start()
    time.sleep(0.1)
    assert got == []  # none free: it waits
    slots.give(3)
    waiter.join(2)
    assert got == [3]
    slots.give(2 + 3)
    assert slots.free == 5


def test_a_taker_whose_slots_another_took_while_it_waited_for_more_waits_for_one_again():
    slots = CallSlots(4)
    assert slots.take(3) == 3
    got: list[int] = []
    patient = threading.Thread(target=lambda: got.append(slots.take(4, patience=0.3)))
    patient.start()
    time.sleep(0.1)  # one slot is free: the patient taker waits for three more
    assert slots.take(1) == 1  # another taker empties the slots meanwhile
    time.sleep(0.4)  # past the patience, with none free
    assert got == []  # it did not come back with nothing
    slots.give(2)
    patient.join(2)
    assert got == [2]


def test_slots_count_the_tickets_waiting_for_them_and_never_below_zero():
    slots = CallSlots(4)
    slots.expect(10)
    assert slots.take(10) == 4
    slots.expect(-4)
    assert slots.waiting == 6 and slots.free == 0
    slots.expect(-8)  # a caller giving back more than it counted does not go negative
    assert slots.waiting == 0


def test_pool_returns_results_and_exceptions_in_order_and_runs_the_first_inline():
    pool = CallPool(4)
    caller = threading.get_ident()
    # Three calls that can only all finish if they run at the same time.
    together = threading.Barrier(3, timeout=10)
    threads: dict[int, int] = {}

    def ok(n: int):
        def call() -> int:
            threads[n] = threading.get_ident()
            together.wait()
            return n

        return call

    def boom() -> int:
        raise ValueError("no label")

    results = pool.run([ok(1), boom, ok(3), ok(4)])
    assert results[0] == 1 and results[2] == 3 and results[3] == 4
    assert isinstance(results[1], ValueError)
    assert threads[1] == caller and caller not in (threads[3], threads[4])
    pool.shutdown()


def test_pool_lets_a_base_exception_through():
    pool = CallPool(2)

    def stop() -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pool.run([lambda: 1, stop])
    pool.shutdown()


def _wait_for(ready: Callable[[], object], seconds: float) -> None:
    """Poll until `ready()` is truthy or `seconds` pass (the assertions after it say which)."""
    deadline = time.monotonic() + seconds
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.005)


class Recorder:
    """Stands where relay.Publisher does: records the rows (ints here) of each `send_claimed`,
    and each `mark_sent` with the time it came."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.marks: list[tuple[float, list[int]]] = []
        self.delay = delay

    def send_claimed(self, rows: list[int]) -> list[int]:
        time.sleep(self.delay)
        self.batches.append(list(rows))
        return list(rows)

    def mark_sent(self, rows: list[int]) -> None:
        self.marks.append((time.monotonic(), list(rows)))


def test_a_lone_id_is_published_at_once_and_a_burst_shares_publishes():
    recorder = Recorder(delay=0.02)
    # A linger far longer than the wait below: the lone id must not be held for it.
    batcher = PublishBatcher(recorder, linger=30.0)  # type: ignore[arg-type]
    batcher.start()
    batcher.submit([1])
    _wait_for(lambda: recorder.batches, 10)
    assert recorder.batches == [[1]]
    for i in range(2, 42):
        batcher.submit([i])
    # stop() publishes what is waiting without lingering.
    batcher.stop()
    published = [i for batch in recorder.batches for i in batch]
    assert sorted(published) == list(range(1, 42))
    # 40 ids arriving together went out in a few publishes, not 40.
    assert len(recorder.batches) <= 3


def test_waves_hand_back_a_fast_answer_before_a_slow_one():
    pool = CallPool(4)
    go = threading.Event()

    def slow() -> str:
        assert go.wait(10)
        return "slow"

    waves = pool.waves([slow, lambda: "fast", lambda: "also fast"])
    first = next(waves)
    # The slow call cannot have finished: it waits for this test to let it go.
    assert 0 not in dict(first) and set(dict(first).values()) <= {"fast", "also fast"}
    go.set()
    rest = [pair for wave in waves for pair in wave]
    assert dict(first + rest) == {0: "slow", 1: "fast", 2: "also fast"}
    pool.shutdown()


def test_with_a_backlog_lone_ids_linger_and_go_out_together():
    recorder = Recorder(delay=0.0)
    batcher = PublishBatcher(
        recorder,  # type: ignore[arg-type]
        linger=0.0,
        backlog=lambda: True,
        backlog_linger=0.5,
    )
    batcher.start()
    batcher.submit([1])
    time.sleep(0.1)
    assert recorder.batches == []  # held back: the queue is behind anyway
    for i in range(2, 6):
        batcher.submit([i])
        time.sleep(0.01)
    _wait_for(lambda: recorder.batches, 10)
    batcher.stop()
    assert recorder.batches == [[1, 2, 3, 4, 5]]


def test_a_failing_backlog_probe_publishes_at_once():
    recorder = Recorder(delay=0.0)

    def broken() -> bool:
        raise ConnectionError("broker down")

    batcher = PublishBatcher(recorder, backlog=broken, backlog_linger=30.0)  # type: ignore[arg-type]
    batcher.start()
    batcher.submit([7])
    _wait_for(lambda: recorder.batches, 10)
    batcher.stop()
    assert recorder.batches == [[7]]


def test_backlog_asks_the_broker_at_most_once_per_interval():
    depths = iter([10, 0, None])
    asked: list[int] = []

    def depth() -> int | None:
        asked.append(1)
        return next(depths)

    backlog = Backlog(depth, threshold=4, interval=0.2)
    assert backlog() is True
    assert backlog() is True and len(asked) == 1  # cached within the interval
    time.sleep(0.25)
    assert backlog() is False and len(asked) == 2  # 0 waiting
    time.sleep(0.25)
    assert backlog() is False and len(asked) == 3  # unknown depth: no backlog


def test_held_tickets_counts_classify_ids_and_other_messages_as_one():
    def request(task: str, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(task_name=task, kwargs=kwargs)

    held = [
        request(CLASSIFY_TASK, ticket_ids=[1, 2, 3]),
        request(CLASSIFY_TASK, ticket_id=4),
        request(DELIVER_TASK, dispatch_ids=[5, 6, 7, 8]),
        request(DELIVER_TASK, dispatch_id=9),
    ]
    assert held_tickets(held) == 3 + 1 + 1 + 1
    assert held_tickets([]) == 0


def test_a_patient_take_waits_for_enough_slots_and_an_impatient_one_does_not():
    slots = CallSlots(4)
    assert slots.take(4) == 4
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(slots.take(3, patience=5.0)))
    waiter.start()
    slots.give(1)
    time.sleep(0.1)
    assert got == []  # one free, three wanted: still waiting for more
    slots.give(2)
    waiter.join(5)
    assert got == [3]
    slots.give(2)  # 2 free of 4
    assert slots.take(4, patience=0.05) == 2  # patience runs out: it takes what there is


def test_held_slots_go_back_as_calls_finish_and_the_rest_at_the_end():
    slots = CallSlots(8)
    held = HeldSlots(slots, slots.take(6))
    assert slots.free == 2
    held.give(2)
    assert slots.free == 4
    held.give(10)  # never more than it holds
    assert slots.free == 8
    held.give_rest()
    assert slots.free == 8


def test_a_call_gives_its_slot_back_as_it_returns_while_its_batch_is_busy_with_another():
    slots = CallSlots(3)
    held = HeldSlots(slots, slots.take(3))
    pool = CallPool(3)
    release = threading.Event()

    def slow(n: int, seconds: float) -> Callable[[], int]:
        def call() -> int:
            time.sleep(seconds)
            return n

        return call

    waves = pool.waves(
        [
            held.released(slow(1, 0.0)),
            held.released(slow(2, 0.3)),
            held.released(lambda: 3 if release.wait(10) else 0),
        ]
    )
    assert [i for i, _ in next(waves)] == [0]
    # The batch's thread is busy with the first wave (recording it, say) and does not ask for
    # the next one: the second call's slot comes back all the same when it returns.
    _wait_for(lambda: slots.free == 2, 5)
    assert slots.free == 2
    release.set()
    assert sorted(i for wave in waves for i, _ in wave) == [1, 2]
    assert slots.free == 3
    held.give_rest()  # nothing left to give: the slots are never over-counted
    assert slots.free == 3
    pool.shutdown()


def test_sent_rows_are_marked_together_a_moment_later_and_on_stop():
    recorder = Recorder(delay=0.0)
    batcher = PublishBatcher(recorder, linger=0.0)  # type: ignore[arg-type]
    batcher.start()
    started = time.monotonic()
    for i in range(1, 6):
        batcher.submit([i])
        time.sleep(0.02)
    _wait_for(lambda: recorder.marks, 10)
    # Each row went out alone, at once; the marks waited and went in one transaction.
    assert recorder.batches == [[1], [2], [3], [4], [5]]
    assert [rows for _at, rows in recorder.marks] == [[1, 2, 3, 4, 5]]
    assert recorder.marks[0][0] - started >= MARK_DELAY_SECONDS
    # stop() marks what was sent without waiting for the delay.
    batcher.submit([6])
    batcher.stop()
    assert [rows for _at, rows in recorder.marks] == [[1, 2, 3, 4, 5], [6]]


def _paced(batcher: PublishBatcher, n: int, every: float) -> None:
    batcher.start()
    for i in range(1, n + 1):
        batcher.submit([i])
        time.sleep(every)
    batcher.stop()


def test_a_steady_stream_shares_publishes_only_when_gathering_is_asked_for():
    # Ids 10 ms apart, each publish at once: with gather_stream the batcher sees ids due
    # within its linger and waits for them; without, every id goes as it comes.
    gathered, alone = Recorder(), Recorder()
    _paced(PublishBatcher(gathered, linger=0.2, gather_stream=True), 20, 0.01)  # type: ignore[arg-type]
    _paced(PublishBatcher(alone, linger=0.2), 20, 0.01)  # type: ignore[arg-type]
    for recorder in (gathered, alone):
        assert sorted(i for batch in recorder.batches for i in batch) == list(range(1, 21))
    assert len(gathered.batches) <= 5
    assert len(alone.batches) >= 10


def test_one_handoff_of_several_rows_is_not_held_back():
    # A batch's deliveries handed over together are not a rate: they go at once, not after
    # the linger that several waiting handoffs would earn.
    recorder = Recorder()
    batcher = PublishBatcher(recorder, linger=30.0)  # type: ignore[arg-type]
    batcher.start()
    batcher.submit([1, 2, 3, 4])
    _wait_for(lambda: recorder.batches, 5)
    assert recorder.batches == [[1, 2, 3, 4]]
    batcher.stop()


def test_the_gate_runs_at_most_its_limit_and_the_next_in_line_on_the_thread_just_freed():
    threads = ThreadPoolExecutor(4)
    gate = CallGate(2, threads, max_wait=30)
    release = threading.Event()
    order: list[str] = []
    ran_on: dict[str, int] = {}

    def call(name: str, wait: bool) -> Callable[[], str]:
        def run() -> str:
            order.append(name)
            ran_on[name] = threading.get_ident()
            if wait:
                assert release.wait(10)
            return name

        return run

    futures = [gate.submit(call(n, wait=n in "ab")) for n in "abcd"]
    _wait_for(lambda: gate.running == 2 and gate.waiting == 2, 5)
    time.sleep(0.1)
    # Four threads are free for the asking, but only two calls run: the others wait in line.
    assert order == ["a", "b"] and gate.waiting == 2
    release.set()
    assert [f.result(10) for f in futures] == ["a", "b", "c", "d"]
    assert order[2:] == ["c", "d"]  # in the order they came
    # Each waiting call started on a thread whose call had just ended, not on a fresh one.
    assert {ran_on["c"], ran_on["d"]} <= {ran_on["a"], ran_on["b"]}
    assert gate.running == 0 and gate.waiting == 0
    threads.shutdown()


def test_a_call_that_waited_too_long_in_line_is_not_made():
    threads = ThreadPoolExecutor(2)
    gate = CallGate(1, threads, max_wait=0.1)
    made: list[str] = []

    def slow() -> str:
        made.append("slow")
        time.sleep(0.3)
        return "slow"

    first = gate.submit(slow)
    late = gate.submit(lambda: made.append("late") or "late")
    assert first.result(5) == "slow"
    with pytest.raises(CallNotStarted, match="waited"):
        late.result(5)
    assert made == ["slow"]
    # The slot it would have had is free again.
    assert gate.submit(lambda: "next").result(5) == "next"
    _wait_for(lambda: gate.running == 0, 5)
    assert gate.running == 0
    threads.shutdown()


def test_run_here_uses_the_callers_thread_when_a_slot_is_free_and_waits_in_line_when_not():
    threads = ThreadPoolExecutor(2)
    gate = CallGate(1, threads, max_wait=30)
    caller = threading.get_ident()
    assert gate.run_here(threading.get_ident).result() == caller
    release = threading.Event()
    busy = gate.submit(lambda: release.wait(10))
    _wait_for(lambda: gate.running == 1, 5)
    got: list[int] = []
    waiter = threading.Thread(
        target=lambda: got.append(gate.run_here(threading.get_ident).result())
    )
    waiter.start()
    _wait_for(lambda: gate.waiting == 1, 5)
    assert gate.waiting == 1 and got == []
    release.set()
    waiter.join(5)
    assert busy.result() is True
    # It ran on the thread that freed the slot, and its caller got the answer.
    assert len(got) == 1 and got[0] not in (caller, waiter.ident)
    threads.shutdown()


def test_a_pool_claims_a_few_tickets_more_than_it_calls():
    pool = CallPool(64)
    assert pool.gate.limit == 64
    assert pool.slots.limit == 64 + claim_ahead(64) == 80
    assert CallPool(1).slots.limit == 2  # even the smallest pool has one ticket ready
    pool.shutdown()
