"""`python -m ner_stream`: the `ner-stream` command line."""

from ner_stream.cli import main

main()
