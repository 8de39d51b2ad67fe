"""Memory stays flat over a long run: nothing the consumer keeps grows with the stream."""

from __future__ import annotations

import gc
import tracemalloc
from itertools import islice

import pytest

from consumer.models import Customer, Order, OrderLine, ProcessedEvent
from orderflow.tools.samples import SampleStream
from tests.helpers import (
    TestEnv,
    applied_count,
    eventually,
    expected_outcome,
    produce,
    running_consumer,
)

pytestmark = pytest.mark.integration


def orm_objects_alive() -> int:
    gc.collect()
    kinds = (Order, OrderLine, Customer, ProcessedEvent)
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kinds))


def consumer_heap(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated and still alive, leaving out this test's own sample data."""
    ignored = [
        tracemalloc.Filter(False, "*/orderflow/tools/samples.py"),
        tracemalloc.Filter(False, __file__),
        tracemalloc.Filter(False, tracemalloc.__file__),
    ]
    return sum(stat.size for stat in snapshot.filter_traces(ignored).statistics("filename"))


@pytest.mark.timeout(180)
async def test_no_identity_map_or_buffer_grows_with_the_stream(env: TestEnv) -> None:
    stream = SampleStream(seed=21, fault_every=0)
    settings = env.with_settings(consumer_batch_size=200)
    produced: list[tuple[bytes | None, bytes | None]] = []
    heap: list[int] = []
    async with running_consumer(settings) as consumer:
        tracemalloc.start()
        try:
            for _ in range(4):
                chunk = [(m.key, m.value) for m in islice(stream, 1500)]
                produced += chunk
                await produce(env.settings, chunk)

                async def caught_up(target: int = len(expected_outcome(produced).applied)) -> None:
                    assert await applied_count(env.sessions) == target

                await eventually(caught_up, within=60)

                async def let_go() -> None:
                    # (The last batch's frame lets go once its task resumes after COMMIT.)
                    # No ORM object outlives its batch (sessions are per batch), ...
                    assert orm_objects_alive() == 0
                    # ... no lane holds records it has applied, ...
                    assert all(not lane.records for lane in consumer._lanes.values())

                await eventually(let_go, within=5)
                heap.append(consumer_heap(tracemalloc.take_snapshot()))
        finally:
            tracemalloc.stop()
    # ... and the heap after 6,000 events is about what it was after 1,500.
    assert heap[-1] < heap[0] + 1024 * 1024, heap
