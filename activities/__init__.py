"""Activities: every side effect of a session (sandboxes, planning, the event log)."""
