"""orderflow's application shell, in wings that show who uses what.

- ``cli/``: the ``orderflow`` command line, one module per command family;
- ``runtime/``: what a production process is made of (settings, wiring, services,
  health, metrics, logs, signals, topics, migrations);
- ``tools/``: what operators and other teams run (backfill, replay, dlq, upstream tools,
  sample traffic, progress);
- ``devstand/``: only for ``orderflow dev`` and the tests' embedded services;
- ``api.py`` (the read API), ``contracts.py`` (the published schemas) and
  ``subscriber.py`` (the example subscriber, written to be copied).

The runtime imports neither the command line nor the tools; the tools never import the
command line; only the ``dev`` command imports the dev stand. ``tests/unit/test_layout.py``
checks these rules.
"""

__version__ = "0.1.0"
