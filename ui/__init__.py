"""The dashboard (Jinja2 + htmx)."""
