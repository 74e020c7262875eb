"""The PostgreSQL server the tests use, and a plain engine for looking behind the ledger's back.

A module of its own, not conftest.py: test files import `engine` from here, and
the fixtures in conftest.py use both.
"""

from __future__ import annotations

import os

import sqlalchemy as sa

# The server CI and every developer machine have (trust auth); override to test elsewhere.
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def engine(url: str) -> sa.Engine:
    """A plain engine on `url`, for what the tests set up or inspect behind the ledger's back."""
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
