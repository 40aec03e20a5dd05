"""HTTP: the app and its routes, middleware, handlers, caller auth, errors, /openapi.json."""
