"""What a production process is made of: settings, wiring, the consume and relay services,
health, metrics, logs, signals, topics and migrations.

Nothing here imports the command line (``orderflow.cli``), the tools (``orderflow.tools``)
or the dev stand (``orderflow.devstand``).
"""
