"""`mllama serve`: an OpenAI-compatible HTTP server (plus Ollama's /api/chat) for one model.
app.py builds the application, queue.py runs one generation at a time behind a bounded wait queue,
requests.py checks request bodies, openai_routes.py and ollama_routes.py speak the two protocols."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
