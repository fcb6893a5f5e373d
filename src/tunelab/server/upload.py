"""A multipart/form-data upload streamed straight to its file, with the size limit enforced
while the bytes arrive: an over-size upload is refused at the first byte past the limit (or
at once, from its Content-Length), never after being held in memory or on disk whole.

Starlette's form parser spools a file part to a temporary file with no size limit before the
route runs; this reads the request stream itself with python-multipart's streaming parser.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from tunelab.server.errors import APIError

MAX_FIELD_BYTES = 64 * 1024      # a text field (purpose, model) is a few bytes
MAX_PARTS = 16
SLACK = 64 * 1024                # multipart framing and text fields around the file


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    field_name: str | None = None       # the form field that held the file
    filename: str | None = None
    path: Path | None = None
    size: int = 0


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> APIError:
    return APIError(413, f"File too large: the limit is {limit:,} bytes ({limit / 2**20:g} MiB)",
                    param="file", code="file_too_large")


def _malformed(why: str) -> APIError:
    return APIError(400, f"Malformed multipart/form-data request: {why}", param="file",
                    code="invalid_multipart")


async def receive(request: Request, limit: int, open_file: Callable[[str], Path]) -> Upload:
    """Parse the request body; the one file part is written to `open_file(filename)`."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data":
        raise APIError(415 if ctype else 400, "Expected a multipart/form-data body with a "
                       "'file' part", param="file", code="invalid_content_type")
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise _malformed("no boundary in Content-Type")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _malformed("bad Content-Length")
        if int(declared) > limit + SLACK:
            raise _too_large(limit)

    up = Upload()
    state = {"headers": {}, "field": None, "name": None, "parts": 0, "ended": False}
    header_field, header_value = bytearray(), bytearray()
    field_buf = bytearray()
    pending: list[bytes] = []     # file bytes parsed from the current chunk, written off-loop
    handle: list[IO[bytes]] = []

    def on_part_begin():
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise _malformed("too many parts")
        state["headers"] = {}
        field_buf.clear()

    def on_header_field(data, start, end):
        header_field.extend(data[start:end])

    def on_header_value(data, start, end):
        header_value.extend(data[start:end])

    def on_header_end():
        state["headers"][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished():
        disp, opts = parse_options_header(state["headers"].get(b"content-disposition"))
        if disp != b"form-data" or b"name" not in opts:
            raise _malformed("a part without Content-Disposition: form-data; name=...")
        name = opts[b"name"].decode("utf-8", "replace")
        state["name"] = name
        if b"filename" in opts:
            if up.path is not None:
                raise _malformed("more than one file part")
            up.field_name = name
            up.filename = opts[b"filename"].decode("utf-8", "replace")
            up.path = open_file(up.filename)
            handle.append(up.path.open("wb"))
            state["field"] = "file"
        else:
            state["field"] = "text"

    def on_part_data(data, start, end):
        n = end - start
        if state["field"] == "file":
            up.size += n
            if up.size > limit:
                raise _TooLarge
            pending.append(bytes(data[start:end]))
        else:
            if len(field_buf) + n > MAX_FIELD_BYTES:
                raise _malformed(f"field '{state['name']}' is too long")
            field_buf.extend(data[start:end])

    def on_part_end():
        if state["field"] == "text":
            up.fields[state["name"]] = field_buf.decode("utf-8", "replace")
        state["field"] = None

    def on_end():
        state["ended"] = True

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_end": on_end})

    def flush():
        if pending and handle:
            handle[0].write(b"".join(pending))
        pending.clear()

    try:
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
                await anyio.to_thread.run_sync(flush)
        parser.finalize()
        if not state["ended"]:
            raise _malformed("the body ended before the closing boundary")
    except _TooLarge:
        _discard(handle, up)
        raise _too_large(limit) from None
    except APIError:
        _discard(handle, up)
        raise
    except ClientDisconnect:
        _discard(handle, up)
        raise _malformed("the client disconnected") from None
    except Exception as e:   # python-multipart's parse errors
        _discard(handle, up)
        raise _malformed(str(e) or type(e).__name__) from None
    finally:
        for h in handle:
            h.close()
    return up


def _discard(handle: list[IO[bytes]], up: Upload) -> None:
    for h in handle:
        h.close()
    if up.path is not None:
        up.path.unlink(missing_ok=True)
