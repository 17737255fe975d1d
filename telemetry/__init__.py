"""What Berth tells its operator: Prometheus metrics (``metrics``) and log lines with the ids
of what they are about (``logs``). On the ground floor, so every package can report."""
