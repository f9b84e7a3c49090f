"""Every failure answered in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI clients read that object (the ``openai`` package raises ``BadRequestError`` and the like
with its message), so a bad request says what was wrong in the words a client shows, and no
failure of one request stops the server.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """A request the server answers with ``status`` and an OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    """Pydantic's error location as a JSON path: ``messages[0].content``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """Well-formed JSON of the wrong shape: 422 naming the first wrong field."""
    first = errors[0]
    where = _location(tuple(part for part in first["loc"] if part != "body"))
    return APIError(422, f"{where}: {first['msg']}" if where else first["msg"], param=where or None,
                    code="invalid_value")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(list(error.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail), code=None).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(500, f"internal error: {type(error).__name__}", type="server_error").response()
