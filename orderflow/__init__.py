"""orderflow's composition root: settings, wiring, the CLI and the embedded dev stack."""

__version__ = "0.1.0"
