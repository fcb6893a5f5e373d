"""Every error answers in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

That includes FastAPI's own request validation (422 there, 400 here, as OpenAI answers a bad
field), unknown routes and methods, user errors from tunelab (TunelabError names its field,
which becomes `param`) and, without details, unexpected failures.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab.server")

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error",
         409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ErrorObject(BaseModel):
    message: str = Field(description="what is wrong, in words")
    type: str = Field(description="invalid_request_error, permission_error, rate_limit_error "
                      "or server_error")
    param: str | None = Field(description="the request field at fault (dotted: "
                              "tunelab.lora.r, messages[0].content), or null")
    code: str | None = Field(description="a stable code to switch on (model_not_found, "
                             "invalid_training_file, ...), or null")


class ErrorResponse(BaseModel):
    """Every error the API answers, whatever its status."""
    error: ErrorObject


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "invalid_request_error")


def not_found(what: str, id_: str, param: str = "id") -> APIError:
    return APIError(404, f"No such {what}: {id_}", param=param, code="not_found")


def body(message: str, type: str, param: str | None = None, code: str | None = None
         ) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _response(status: int, message: str, *, param=None, code=None, type=None,
              headers=None) -> JSONResponse:
    return JSONResponse(body(message, type or TYPES.get(status, "invalid_request_error"), param,
                             code), status_code=status, headers=headers)


def _loc_param(loc: tuple) -> str | None:
    # ("body", "messages", 0, "content") -> "messages[0].content"; the source part is dropped
    parts = [p for p in loc if p not in ("body", "query", "path", "header", "form")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "int", "float", "bool", "list", "dict") or "[" in str(p) or \
                str(p).startswith(("literal", "function", "constrained")):
            continue   # a union member's tag, not a field
        else:
            out += ("." if out else "") + str(p)
    return out or None


# pydantic's error type -> the code a client switches on (OpenAI's names where it has one)
VALIDATION_CODES = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter",
                    "json_invalid": "invalid_json"}


def validation_message(err: dict[str, Any]) -> tuple[str, str | None]:
    param = _loc_param(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    if kind == "json_invalid":
        return "We could not parse the JSON body of your request: " \
               f"{err.get('ctx', {}).get('error', 'invalid JSON')}", None
    msg = err.get("msg", "invalid value")
    return (f"Invalid value for '{param}': {msg}" if param else msg), param


def _required_fields(request: Request) -> list[str]:
    """The required top-level fields of the route's JSON body, for a request that sent none."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    fields = getattr(model, "model_fields", {})
    return [name for name, f in fields.items() if f.is_required()]


def whole_body_problem(request: Request, errors: list[dict[str, Any]]
                       ) -> tuple[int, str, str] | None:
    """(status, message, code) when the body as a whole is wrong: none at all, not JSON (415),
    or JSON that is not an object; None when the problem is a field's."""
    if len(errors) != 1 or tuple(errors[0].get("loc", ())) != ("body",):
        return None
    err = errors[0]
    if err.get("type") == "missing":
        needed = _required_fields(request)
        return 400, ("The request has no body: expected a JSON object" +
                     (f" with {', '.join(repr(n) for n in needed)}" if needed else "")), \
            "missing_body"
    if isinstance(err.get("input"), (bytes, bytearray)):   # FastAPI read no JSON from it
        ctype = request.headers.get("content-type") or "none"
        return 415, (f"Expected a JSON body (Content-Type: application/json), got Content-Type "
                     f"{ctype}"), "invalid_content_type"
    got = type(err.get("input")).__name__
    got = {"list": "an array", "str": "a string", "int": "a number", "float": "a number",
           "bool": "a boolean", "NoneType": "null"}.get(got, got)
    return 400, f"The request body must be a JSON object, not {got}", "invalid_body"


# errors saying "not this member of the union": when another member of the same field matched
# its type and failed a bound, that one says what is wrong
_MEMBER_MISMATCH = ("literal_error", "_type", "_parsing")


def first_problem(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first field's problem, in words, and the field. A value failing a union such as
    "auto" | int <= 50 gets one pydantic error per member; 100 must read "less than or equal
    to 50", not "should be 'auto'"."""
    fields: dict[str | None, list[dict[str, Any]]] = {}
    for err in errors:
        fields.setdefault(_loc_param(tuple(err.get("loc", ()))), []).append(err)
    if not fields:
        return "invalid request", None
    errs = next(iter(fields.values()))
    specific = [e for e in errs if not e.get("type", "").endswith(_MEMBER_MISMATCH)]
    if specific or len(errs) == 1:
        message, param = validation_message((specific or errs)[0])
    else:   # no member matched: say what each would take
        param = _loc_param(tuple(errs[0].get("loc", ())))
        wants = " or ".join(dict.fromkeys(e.get("msg", "").removeprefix("Input should be ")
                                          for e in errs))
        message = f"Invalid value for '{param}': Input should be {wants}"
    if len(fields) > 1:
        message += f" (and {len(fields) - 1} more problems)"
    return message, param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _response(e.status, e.message, param=e.param, code=e.code, type=e.type,
                         headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(req: Request, e: RequestValidationError):
        errors = list(e.errors())
        whole = whole_body_problem(req, errors)
        if whole is not None:
            status, message, code = whole
            return _response(status, message, code=code)
        message, param = first_problem(errors)
        kinds = [err.get("type", "") for err in errors
                 if _loc_param(tuple(err.get("loc", ()))) == param]
        code = next((VALIDATION_CODES[k] for k in kinds if k in VALIDATION_CODES),
                    "invalid_value")
        return _response(400, message, param=param, code=code)

    @app.exception_handler(TunelabError)
    async def _tunelab(_req: Request, e: TunelabError):
        return _response(400, str(e), param=e.field, code=e.kind or "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else "request failed"
        if e.status_code == 404 and message == "Not Found":
            message = "Unknown request URL. Please check the URL and method."
        return _response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, e: Exception):
        log.exception("unexpected error on %s %s", req.method, req.url.path)
        return _response(500, "The server had an error while processing your request.",
                         code="server_error")
