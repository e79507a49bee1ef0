"""The agent's debugging and monitoring surface: admin API, metrics, readiness, access logs."""
