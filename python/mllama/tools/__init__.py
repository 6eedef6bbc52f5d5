"""Developer tools (python -m mllama.tools.<name>)."""
