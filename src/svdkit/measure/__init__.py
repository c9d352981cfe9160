"""Measuring a model: perplexity, zero-shot accuracy (lm-evaluation-harness), speed and memory."""
