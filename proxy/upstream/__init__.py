"""Talking to TeamUp: the HTTP client, and the guard (budget, circuit) in front of it."""
