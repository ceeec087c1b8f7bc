"""The one error shape of the API: {"error": {"code", "message"}}."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
