"""Shared fixtures: a real tritonserver on the rendered CPU repository (session scope); skips that fail."""

pytest_plugins = ["pytester", "tests.fixtures.triton", "tests.fixtures.gateway", "tests.fixtures.skips"]
