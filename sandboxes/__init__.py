"""Sandboxes: the machines sessions run in, the providers that make them, and the gateway
their guest agents dial into."""
