"""The published schema (/openapi.json) says what the API really answers.

FastAPI documents a 422 on every route with inputs, and nothing else; this API answers 422
never (a bad field is OpenAI's 400) and answers 400, 401, 404, 413 and 415 in OpenAI's error
shape. Each route's error responses are read off the route itself, so a route added later is
documented by the same rules:

- 400: it takes a body or query parameters (a bad field), or says so itself;
- 401: it needs a key (depends on `owner`);
- 404: a path parameter or a body names something (a file, a job, a model) that may not exist;
- 413: it accepts a body (any method but GET / HEAD / DELETE / OPTIONS: server.limits);
- 415: its body is JSON, or the upload's multipart;
- anything else a route answers (403, 409, 503) it declares with `responses=errors(...)`.

tests/test_server.py runs schemathesis with its status-code and response-schema checks against
this document, so a route that answers a status it does not publish fails there.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from tunelab.server.context import owner
from tunelab.server.errors import ErrorResponse

DESCRIPTIONS = {
    400: "A bad request: `error.param` names the field at fault",
    401: "No API key, or an unknown one",
    403: "Not allowed on this object",
    404: "No such object for this key (another key's objects answer 404 too)",
    409: "The object is in use",
    413: "The body is larger than this server takes",
    415: "The body is not of the content type this operation reads",
    503: "The service is not available on this server",
}
_NO_BODY = {"GET", "HEAD", "DELETE", "OPTIONS"}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route's decorator: error statuses it answers beyond the rules above."""
    return {s: {"model": ErrorResponse, "description": DESCRIPTIONS[s]} for s in statuses}


def _needs_key(route: APIRoute) -> bool:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if dep.call is owner:
            return True
        stack += dep.dependencies
    return False


def route_errors(route: APIRoute) -> set[int]:
    """The error statuses a route can answer, by the rules in the module docstring."""
    d = route.dependant
    extra = route.openapi_extra or {}
    has_body = route.body_field is not None or "requestBody" in extra
    found = set()
    if has_body or d.query_params:
        found.add(400)
    if _needs_key(route):
        found.add(401)
    if d.path_params or has_body:
        found.add(404)
    if set(route.methods) - _NO_BODY:
        found.add(413)
    if has_body:
        found.add(415)
    return found


def _api_routes(routes) -> list[APIRoute]:
    """Every APIRoute, through included routers (FastAPI keeps those as routers, not copies)."""
    out: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            out.append(route)
        elif getattr(route, "original_router", None) is not None:
            out += _api_routes(route.original_router.routes)
    return out


def document(app: FastAPI) -> None:
    """Publish every route's error responses (OpenAI's error shape) and no 422."""
    found = {(route.path_format, method.lower()): route_errors(route)
             for route in _api_routes(app.routes) for method in route.methods}
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            for path, ops in schema.get("paths", {}).items():
                for method, op in ops.items():
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)
                    for status in sorted(found.get((path, method), ())):
                        responses.setdefault(str(status), {
                            "description": DESCRIPTIONS[status],
                            "content": {"application/json": {"schema": error_ref}}})
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            defs = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(defs.pop("$defs", {}))
            components["ErrorResponse"] = defs
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
