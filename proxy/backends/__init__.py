"""Redis and its in-process stand-ins: the link, keys, Lua scripts, stores, limiters, leases."""
