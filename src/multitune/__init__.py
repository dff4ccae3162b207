"""multitune: fine-tune one open LLM on several tasks at once, then evaluate it per task."""

__version__ = "0.1.0"
