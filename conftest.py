"""Root pytest configuration: the per-notebook time table printed after a notebook run."""

pytest_plugins = ["tests.timing_plugin"]
