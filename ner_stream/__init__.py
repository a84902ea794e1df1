"""ner-stream: a streaming named-entity recognition worker for Apache Kafka."""

import os
from importlib.metadata import PackageNotFoundError, version

# oneDNN, under torch's CPU operators, keeps the kernels it builds for each tensor shape (up to
# 1,024 of them) and holds their memory. A worker's passes come in hundreds of shapes (rows x
# length), so its model process grew with each new shape it met; without the cache passes ran
# no slower (docs/operations.md, "Memory"). Read when oneDNN
# builds its first kernel, so it must be set before any tensor work; a value the user set wins.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
os.environ.setdefault(ONEDNN_CACHE_ENV, "0")

try:
    __version__ = version("ner-stream")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
