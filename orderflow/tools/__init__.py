"""What operators and other teams run, next to the production processes: backfills,
replays, dead-letter tools, the upstream tools (import, publish, loadgen) and their
sample traffic, and what they share: bounded reads of a topic's offset ranges, progress
bars, rate limits and summaries.

Tools may use :mod:`orderflow.runtime`; the runtime never uses them, and nothing here
imports the command line (``orderflow.cli``).
"""
