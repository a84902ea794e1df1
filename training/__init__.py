"""ner-train: train and evaluate the ner-stream tagger."""
