"""Ingestion: the tokenize stage against a transformers tokenizer loop."""
