"""Fixtures shared by the integration tests that run `ner-stream run` subprocesses: the tiny model
file, fresh topics and a worker starter (defined with the worker's own tests)."""

from tests.integration.test_worker import make_topics, start_worker, tiny_model  # noqa: F401
