"""The agent inside each sandbox. Standard library and ``websockets`` only: it must run on a
bare guest image and depends on nothing in the backend."""
