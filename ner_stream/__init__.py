"""ner-stream: a streaming named-entity recognition worker for Apache Kafka."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ner-stream")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
