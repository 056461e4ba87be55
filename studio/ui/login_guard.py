"""An ASGI layer in front of Gradio's login and logout routes.

- ``POST /login``: refused with 429 while the client or the account is locked out after failed attempts
  (``accounts.Throttle``); every answer of Gradio's login is counted as a success or a failure.
- ``GET /logout``: logs out this browser only. Gradio's default logs out every session of the user, which on a
  login shared by several people logged all of them out.

The client is the connecting address; when that is this machine (Gradio's share tunnel connects from here),
the last address in X-Forwarded-For, where the tunnel puts the visitor's.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from studio.accounts import Throttle

MAX_LOGIN_BODY = 16 * 1024


class LoginGuard:
    def __init__(self, app, throttle: Throttle):
        self.app, self.throttle = app, throttle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/")
        if path.endswith("/logout") or path == "/logout":
            query = parse_qs(scope.get("query_string", b"").decode(), keep_blank_values=True)
            query["all_session"] = ["false"]
            scope = {**scope, "query_string": "&".join(f"{k}={v[0]}" for k, v in query.items()).encode()}
            return await self.app(scope, receive, send)
        if scope.get("method") != "POST" or not (path.endswith("/login") or path == "/login"):
            return await self.app(scope, receive, send)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_LOGIN_BODY:
                return await _answer(send, 413, "The login form is too large.")
            if not message.get("more_body"):
                break
        user = (parse_qs(body.decode("utf-8", "replace")).get("username") or [""])[0].strip()
        client = _client(scope)
        wait = self.throttle.wait_s(client, user)
        if wait > 0:
            return await _answer(send, 429, f"Too many failed logins. Try again in {int(wait) + 1} s.")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def watch(message):
            if message["type"] == "http.response.start":
                if message["status"] == 200:
                    self.throttle.succeeded(client, user)
                elif message["status"] in (400, 401, 403):
                    self.throttle.failed(client, user)
            await send(message)
        await self.app(scope, replay, watch)


def _client(scope) -> str:
    peer = (scope.get("client") or ("", 0))[0]
    if peer in ("127.0.0.1", "::1", "localhost"):
        headers = dict(scope.get("headers") or [])
        forwarded = headers.get(b"x-forwarded-for", b"").decode().split(",")
        if forwarded[-1].strip():
            return forwarded[-1].strip()
    return peer


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
