"""Fixture plugins shared by the whole suite.

pytest accepts ``pytest_plugins`` only in the top-level conftest (a nested
one breaks ``pytest .``), so the integration fixture modules register here.
"""

pytest_plugins = ["integration.mounts", "integration.registry"]
