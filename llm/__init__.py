"""The LLM proxy: every model call of Berth (and of users' own tools, through the
OpenAI-compatible endpoint) goes through ``llm.proxy.LLMProxy``."""
