"""The LLM layer: one OpenAI-compatible client per role, the embedded server, the response cache."""
