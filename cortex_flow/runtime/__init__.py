"""The runner: reading, scheduling, handling, committing, claims, heartbeats, reload,
the admin endpoint and metrics."""
