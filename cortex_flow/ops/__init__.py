"""Operator tools over a live Redis: status, dead letters, drift and send."""
