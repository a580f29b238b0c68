"""A web process in client mode, and worker processes that execute its runs."""
