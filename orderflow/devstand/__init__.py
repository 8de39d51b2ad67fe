"""Only for ``orderflow dev`` and the tests' embedded fallback: the embedded PostgreSQL
and Kafka-protocol broker, and the dev command's live view.

No production code imports this package. The one entry is the command line's ``dev``
command, which imports it inside its function, so that ``consume``, ``relay``, ``api``
and the tools never load it.
"""
