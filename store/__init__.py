"""Persistence: tables, the append-only event log and its projection, migrations."""
