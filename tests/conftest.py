"""Shared fixtures: a real tritonserver on the rendered CPU repository (session scope)."""

pytest_plugins = ["tests.fixtures.triton", "tests.fixtures.gateway"]
