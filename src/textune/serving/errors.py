"""Errors and authentication of the server.

Every error is JSON: `{"error": {"status": 413, "message": "..."}}`, except on the OpenAI-compatible chat path,
whose errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so OpenAI's clients raise
their own exceptions (BadRequestError, AuthenticationError, ...) with our message.
"""

from __future__ import annotations

import secrets

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

CHAT_PATH = "/v1/chat/completions"  # OpenAI's API: its errors take OpenAI's shape
EMBEDDINGS_PATH = "/v1/embeddings"  # OpenAI's too (the embedding task)
OPENAI_PATHS = (CHAT_PATH, EMBEDDINGS_PATH)


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody


# What the API's routes may answer besides 200, for the OpenAPI schema.
ERROR_RESPONSES = {s: {"model": ErrorResponse} for s in (400, 401, 411, 413, 422, 503)}
CHAT_ERROR_RESPONSES = {s: {"model": OpenAIErrorResponse} for s in (400, 401, 413, 503)}


class APIError(HTTPException):
    """An HTTP error naming the request field at fault (`param`) and a machine-readable `code`, as OpenAI's
    errors do; other endpoints show only the status and message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status, message, headers=headers)
        self.param, self.code = param, code


def error_response(status: int, message: str, headers: dict | None = None, path: str = "", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """The JSON error of `path`'s shape (OpenAI's on OpenAI's paths, textune's elsewhere)."""
    if path in OPENAI_PATHS:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"message": message, "type": kind, "param": param, "code": code}
    else:
        body = {"status": status, "message": message}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Turn routing misses, HTTP errors, malformed requests and bugs into JSON errors of the path's shape."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code in (404, 405) and exc.detail in ("Not Found", "Method Not Allowed"):  # routing, not ours
            return error_response(exc.status_code, f"no endpoint {request.method} {path}; the API is listed at /docs",
                                  exc.headers, path)
        code = getattr(exc, "code", None) or ("invalid_api_key" if exc.status_code == 401 else None)
        return error_response(exc.status_code, str(exc.detail), exc.headers, path, getattr(exc, "param", None), code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the caller's mistake: uvicorn logs the traceback; the caller still gets JSON.
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details",
                              path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors, path = exc.errors(), request.url.path
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON", path=path)
        fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
        message = "; ".join(f"{field}: {e['msg']}" for field, e in zip(fields, errors))
        if path in OPENAI_PATHS:  # OpenAI answers a malformed request with 400, which its clients raise as BadRequestError
            return error_response(400, message, path=path, param=fields[0])
        return error_response(422, message)


def token_check(token: str | None):
    """The dependency that requires `Authorization: Bearer <token>` (none when `token` is None)."""
    bearer = HTTPBearer(auto_error=False, description="the token named by `textune serve --token-env`")

    def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    return check_token
