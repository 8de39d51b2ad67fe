"""Graceful stop: the first SIGTERM/SIGINT asks to stop; the second one stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

log = logging.getLogger("orderflow")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()

    def first_signal(signum: signal.Signals) -> None:
        log.info("received %s: finishing the batch in flight, then stopping", signum.name)
        stop.set()
        # Restore the default handlers: a second signal ends the process at once.
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, first_signal, sig)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
