"""The ``orderflow`` command line: the Typer app and one module per command family.

:mod:`orderflow.cli.main` is the app and the commands that run or prepare the processes
(``consume``, ``relay``, ``api``, ``migrate``, ``topics``, ``dev``), and adds the other
families to it. The command line may import every wing; no wing imports it.
"""
