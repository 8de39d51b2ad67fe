"""What the relay tells an observer (metrics), and the observer that listens to nothing.

The relay calls these hooks once per batch and on membership changes, never per message.
Hooks must not block, do I/O or raise: they run on the event loop, inside the relay loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol


class PublishedMessage(Protocol):
    """One outbox message the broker acknowledged (the part an observer may read)."""

    @property
    def topic(self) -> str: ...

    @property
    def age(self) -> float:
        """Seconds from the message's insertion (its transaction's start) to when the relay
        read it, by the database's clock."""
        ...


class RelayObserver(Protocol):
    def joined(self) -> None:
        """The relay holds its membership lock: it claims shards and publishes from now on."""

    def left(self) -> None:
        """The relay lost its database connection (and with it its membership and shards),
        or stopped."""

    def published(self, messages: Sequence[PublishedMessage], *, waited: float) -> None:
        """The broker acknowledged ``messages``, ``waited`` seconds after the relay read them.

        So each message's commit-to-ack latency is ``message.age + waited``.
        """


class NoRelayObserver:
    """The default observer: does nothing."""

    def joined(self) -> None:
        pass

    def left(self) -> None:
        pass

    def published(self, messages: Sequence[PublishedMessage], *, waited: float) -> None:
        pass


NO_RELAY_OBSERVER: Final[RelayObserver] = NoRelayObserver()
