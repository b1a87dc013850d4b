"""Persistence: the SQLAlchemy tables, the engine and schema migrations."""
