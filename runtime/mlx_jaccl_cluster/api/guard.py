"""What every request passes before any route sees it: the API key, then the body size.

Plain ASGI, outside FastAPI's routing, for two reasons:

- **The key comes first.** A route dependency runs only after FastAPI has read, parsed
  and validated the whole body, so an unauthenticated client could make rank 0 parse
  megabytes of JSON. Here the ``Authorization`` header is checked before one byte of
  the body is read.
- **The body is capped while it arrives.** A ``Content-Length`` over ``max_body_bytes``
  is refused at once; a chunked body is read only up to the cap, then refused. Either
  way the answer is 413 naming the limit, and nothing larger is ever held. The rest of
  an oversized body is read and thrown away first (at most ``DRAIN_FACTOR`` times the cap,
  for at most ``DRAIN_SECONDS``): a server that closes while the client is still sending
  makes the client's TCP stack see a reset, and the 413 is lost with it (the "lingering
  close" of web servers). A body declared larger than that bound is not read at all.

Repeated wrong keys from one address are slowed down (``KeyThrottle``): after
``api_key_failures`` of them, each further one blocks that address for a doubling time
(1 s, 2 s, ... at most ``KEY_BLOCK_MAX`` s) during which it gets 429 and its keys are not
even compared, so guessing costs time. A right key clears the address. The table of
addresses is bounded (``KEY_TABLE_SIZE``, least recently seen dropped first).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from .errors import APIError, ErrorShape, shaped_response

KEY_BLOCK_MAX = 60.0  # seconds an address may be blocked after repeated wrong keys
KEY_TABLE_SIZE = 4096  # addresses remembered (about 100 bytes each)
PUBLIC_PATHS = ("/health", "/dashboard", "/openapi.json")  # open like /health: no cluster data
PUBLIC_PREFIXES = ("/dashboard/static/",)
BODY_METHODS = ("POST", "PUT", "PATCH")
DRAIN_FACTOR = 64  # an oversized body is read and dropped up to this many times max_body_bytes
DRAIN_SECONDS = 10.0  # ... and for at most this long, so that the client can read the 413


class KeyThrottle:
    """Per client address: wrong keys so far, and until when the address is blocked."""

    def __init__(self, free_failures: int, clock: Callable[[], float] = time.monotonic):
        self.free_failures = free_failures
        self.clock = clock
        self._table: OrderedDict[str, list[float]] = OrderedDict()  # address -> [failures, blocked_until]

    def blocked_for(self, address: str) -> float:
        """Seconds this address must still wait (0: it may try a key now)."""
        entry = self._table.get(address)
        return max(0.0, entry[1] - self.clock()) if entry else 0.0

    def failed(self, address: str) -> None:
        entry = self._table.pop(address, None) or [0, 0.0]
        entry[0] += 1
        over = entry[0] - self.free_failures
        if over > 0:
            entry[1] = self.clock() + min(2.0 ** (over - 1), KEY_BLOCK_MAX)
        self._table[address] = entry
        while len(self._table) > KEY_TABLE_SIZE:
            self._table.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._table.pop(address, None)

    def __len__(self) -> int:
        return len(self._table)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class Guard:
    """ASGI middleware: API key (throttled), then the body cap; the body is handed on whole.

    ``record(scope, error)`` notes a refusal in the app's error history; ``shapes`` are the
    error shapes of the APIs other than OpenAI's (a refusal reaches each client in its own).
    """

    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        max_body_bytes: int,
        key_failures: int,
        record: Callable[[dict, APIError], None],
        shapes: list[ErrorShape] = (),
    ):
        self.app = app
        self.shapes = list(shapes)
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.throttle = KeyThrottle(key_failures)
        self.record = record

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and not is_public(scope["path"]):
            refusal = self._check_key(scope)
            if refusal is not None:
                return await self._refuse(scope, receive, send, refusal)
        if scope["method"] in BODY_METHODS:
            body = await self._read_body(scope, receive)
            if isinstance(body, APIError):
                return await self._refuse(scope, receive, send, body)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _check_key(self, scope) -> APIError | None:
        address = (scope.get("client") or ("unknown",))[0]
        wait = self.throttle.blocked_for(address)
        if wait > 0:
            return APIError(
                429,
                f"too many wrong API keys from {address}; wait {math.ceil(wait)} s",
                code="too_many_failed_keys",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        scheme, _, given = _header(scope, b"authorization").partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
            given = _header(scope, b"x-api-key")
        if hmac.compare_digest(given.strip().encode(), self.key):
            self.throttle.succeeded(address)
            return None
        self.throttle.failed(address)
        return APIError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def _read_body(self, scope, receive) -> bytes | APIError:
        declared = _header(scope, b"content-length")
        too_large = APIError(
            413,
            f"request body is larger than max_body_bytes ({self.max_body} bytes); "
            "send a smaller request or raise MJC_MAX_BODY_BYTES on rank 0",
            code="request_too_large",
        )
        # a client that sent "Expect: 100-continue" waits for the answer before it sends
        # the body: reading (draining) would invite the upload it has not started
        drain = _header(scope, b"expect").lower() != "100-continue"
        if declared.isdigit() and int(declared) > self.max_body:
            if drain and int(declared) <= self.max_body * DRAIN_FACTOR:
                await _drain(receive, self.max_body * DRAIN_FACTOR)
            return too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                if drain and message.get("more_body", False):
                    await _drain(receive, self.max_body * DRAIN_FACTOR - size)
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _refuse(self, scope, receive, send, error: APIError) -> None:
        self.record(scope, error)
        headers = dict(error.headers or {})
        if error.status == 413:
            headers["Connection"] = "close"  # the rest of the body may be unread (see _drain)
        error.headers = headers
        await shaped_response(self.shapes, scope["path"], error)(scope, receive, send)


async def _drain(receive, limit: int) -> None:
    """Read and drop the rest of a body: until it ends, the client leaves, ``limit`` bytes
    or ``DRAIN_SECONDS`` pass, whichever comes first."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while limit > 0:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        limit -= len(message.get("body", b""))


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def _replay(body: bytes, receive):
    """A ``receive`` that gives the already-read body once, then waits on the real one
    (so a route can still notice the client going away)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
