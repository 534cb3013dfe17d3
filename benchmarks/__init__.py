"""exfx benchmarks: model definitions and measurement scripts (not part of the test run)."""
