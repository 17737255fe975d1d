"""The ground floor: every setting of the backend and the keys derived from its secrets.

Imports nothing of the project, so every other package may import it."""
