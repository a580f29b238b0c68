"""Runnable examples of saga in applications (see each module's docstring)."""
