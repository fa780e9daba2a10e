"""Persistence: typed SQLAlchemy models, the one session factory, and repository functions."""
