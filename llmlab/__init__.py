"""llmlab: the package behind the LLM Lab course. One module per topic; see each module's docstring."""
__version__ = "0.1.0"
