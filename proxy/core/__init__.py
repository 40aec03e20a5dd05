"""Pure parts, no aiohttp and no Redis: contracts, canonical queries, entries, GCRA, failures."""
