"""Serving: an OpenAI-compatible HTTP server over the inference engine (`app.py`)."""
