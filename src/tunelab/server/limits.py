"""Request bodies are bounded before anything reads them whole.

A chat request's JSON is parsed in memory, then its text is tokenised: an unbounded body let a
30 MB request (30 messages of 1,000,000 characters, which the schema allows) take 45 s to be
refused and raise the server's RSS from 2.4 to 5.8 GB, 4.2 GB of it kept afterwards. Every body
but a file upload's (which streams to disk under its own --max-upload-mb) is refused with a 413
past --max-body-mb: at once when its Content-Length says so, and as soon as the count passes
the limit when it comes chunked. A pure ASGI middleware: Starlette's BaseHTTPMiddleware would
read the body into memory itself.
"""
from __future__ import annotations

from starlette.exceptions import HTTPException

from tunelab.server.errors import APIError, _response

UPLOAD_PATHS = ("/v1/files",)        # these stream to disk, with their own limit
DEFAULT_MAX_BODY_BYTES = 8 * 2**20   # ~2M tokens of text: beyond any model's context


class BodyTooLarge(APIError, HTTPException):
    """An APIError (its handler gives the OpenAI shape with its code) that FastAPI lets through
    its body parsing, which turns any other exception into "error parsing the body"."""

    def __init__(self, message: str):
        APIError.__init__(self, 413, message, code="request_too_large")
        HTTPException.__init__(self, 413, message)


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return (f"The request body is larger than this server takes ({self.max_bytes / 2**20:g} "
                "MB; `tunelab serve --max-body-mb` sets it)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS") \
                or scope["path"].rstrip("/") in UPLOAD_PATHS:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = _response(413, self._message(), code="request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:   # the route's handler answers it (OpenAI shape)
                    raise BodyTooLarge(self._message())
            return message

        await self.app(scope, counted, send)
