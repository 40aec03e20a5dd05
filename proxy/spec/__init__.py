"""Data: the OpenAPI documents (TeamUp's endpoints, and the proxy's own)."""
