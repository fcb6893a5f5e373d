"""tunelab HTTP server: the OpenAI-compatible API, the generation engine and the web page."""
