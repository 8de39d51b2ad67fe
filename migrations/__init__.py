"""Alembic migrations for orderflow (async ``env.py``); run them with ``orderflow migrate``."""
