"""Fault-injection tests against real processes (redis-server, mock TeamUp, `proxy serve`)."""
