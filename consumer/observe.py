"""What the consume loop tells an observer (metrics), and the observer that listens to nothing.

The loop calls these hooks once per poll, per committed batch, per expiry of parked
events and per rebalance, never per message, so an observer costs the hot path a few
calls per batch. Hooks must not block, do I/O or raise: they run on the event loop,
inside the consume loop.
"""

from __future__ import annotations

from collections.abc import Set
from typing import TYPE_CHECKING, Final, Protocol

from aiokafka import TopicPartition

if TYPE_CHECKING:
    from consumer.apply import BatchOutcome
    from consumer.parking import Expired


class ConsumerObserver(Protocol):
    def fetched(self, count: int) -> None:
        """``count`` records of one partition arrived from the broker (re-fetches included)."""

    def batch_committed(
        self, outcome: BatchOutcome, *, size: int, seconds: float, queued: float | None = None
    ) -> None:
        """One partition's batch of ``size`` records committed in ``seconds`` (one
        transaction), after its oldest record waited ``queued`` seconds since its fetch
        (None: not fetched by the consume loop)."""

    def partitions_assigned(self, partitions: Set[TopicPartition]) -> None:
        """A group (re)join finished with this assignment (possibly empty: a standby)."""

    def parked_expired(self, outcome: Expired) -> None:
        """Parked events of a partition waited too long and were dead-lettered."""


class NoConsumerObserver:
    """The default observer: does nothing."""

    def fetched(self, count: int) -> None:
        pass

    def batch_committed(
        self, outcome: BatchOutcome, *, size: int, seconds: float, queued: float | None = None
    ) -> None:
        pass

    def partitions_assigned(self, partitions: Set[TopicPartition]) -> None:
        pass

    def parked_expired(self, outcome: Expired) -> None:
        pass


NO_CONSUMER_OBSERVER: Final[ConsumerObserver] = NoConsumerObserver()
