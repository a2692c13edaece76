"""Test and simulation tools that users run too: ``fake_server``, an OpenAI-compatible provider simulator that
injects faults (errors, latency, truncation, rate limits with short enforcement windows). Nothing in the pipeline
imports this package."""
