"""The HTTP API: stateless; state lives in the database and in Temporal."""
