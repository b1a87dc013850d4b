"""The HTTP layer: routes, request/response schemas, auth and the error handler table."""
