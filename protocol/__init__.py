"""Versioned wire messages and their validation (arrives with the ring issue)."""
