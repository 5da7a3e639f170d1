"""The HTTP face of the worker: the FastAPI app, its routers and dependencies, and the one place
where domain errors become HTTP statuses (``errors.http_error``)."""
