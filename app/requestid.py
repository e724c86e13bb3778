"""Every request has an id: the caller's ``X-Request-ID`` (when it is a sensible one),
else one generated here. The endpoints read it from ``request.state.request_id`` (the
prediction log keys its records by it) and every answer carries it back in the
``X-Request-ID`` header, errors included."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
# What a caller's id may be: up to 128 visible ASCII characters (a UUID, a trace id).
# Anything else (too long, control characters) is replaced, not echoed into logs.
ACCEPTED = re.compile(rb"[\x21-\x7e]{1,128}")


def request_id(scope: Scope) -> str:
    """The id of a request: its caller's, or a new random one (32 hex digits)."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            if ACCEPTED.fullmatch(value):
                given: str = value.decode("ascii")
                return given
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        # A copy: the state a server hands each request may be shared between them.
        scope["state"] = {**scope.get("state", {}), "request_id": rid}
        header = (HEADER, rid.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
