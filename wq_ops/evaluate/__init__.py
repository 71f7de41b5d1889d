"""Evaluation of a model or an artifact: WikiText-style perplexity."""
