"""Berth's process entry points (``run``, ``worker``) and its settings."""
