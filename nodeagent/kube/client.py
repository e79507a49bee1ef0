"""A small HTTPS client for the Kubernetes API server, over asyncio streams.

Enough HTTP/1.1 for a handful of calls: one request per connection
(`Connection: close`), JSON in and out, `Content-Length` or chunked bodies.
Every call is bounded by one timeout covering connect, TLS, request and
response; the service-account token is read again for every call, because the
kubelet rotates it. Failures raise `KubeError` naming the call and the cause.

`list` and `watch` serve the pods/namespaces cache (nodeagent.kube.watch). A
watch is a long GET whose chunked body is one JSON event per line: it has no
total timeout (the server ends it after `timeoutSeconds`), only a timeout for
the answer's head and a read-idle timeout that notices a dead connection. An
HTTP error status on a watch raises `KubeStatusError`, so a 410 Gone can be
told apart from a lost connection.

`resolve_endpoint` finds the API server the way client-go's in-cluster config
does (KUBERNETES_SERVICE_HOST/PORT, the mounted token and CA), or takes it from
the agent's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from nodeagent.config import Config, ConfigError
from nodeagent.kube.api import MERGE_PATCH, ApiResponse, KubeError

# A few seconds: these calls sit on the shutdown path, which has to fit in
# terminationGracePeriodSeconds together with the connection drain.
DEFAULT_TIMEOUT = 5.0
# A pod or DaemonSet object is a few KiB; anything this large is not an answer to us.
MAX_BODY = 4 * 1024 * 1024
# A LIST of a node's pods or of a cluster's namespaces is larger than one object.
MAX_LIST_BODY = 64 * 1024 * 1024
# Longer than the watches' timeoutSeconds (300 s): a quiet but healthy watch is
# ended by the server first; silence beyond that means a dead connection.
WATCH_IDLE_TIMEOUT = 330.0
USER_AGENT = "nodeagent/0.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeEndpoint:
    """Where the API server is and how to authenticate to it."""

    scheme: str  # https (http only for a local `kubectl proxy`)
    host: str
    port: int
    token_path: str
    ca_path: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def resolve_endpoint(config: Config, environ: Mapping[str, str]) -> KubeEndpoint | None:
    """The API server to use, or None when the agent should not use one (see kube_api)."""
    if config.kube_api == "off":
        return None
    address = config.kube_api_address
    if not address:
        env_host = environ.get("KUBERNETES_SERVICE_HOST", "")
        env_port = environ.get("KUBERNETES_SERVICE_PORT", "")
        if env_host and env_port:
            address = f"https://{f'[{env_host}]' if ':' in env_host else env_host}:{env_port}"
    if not address:
        if config.kube_api == "on":
            raise ConfigError(
                "field 'kube_api': 'on' but no API server known: set KUBE_API_ADDRESS, "
                "or run in a pod (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT)"
            )
        return None
    parts = urlsplit(address)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    if parts.scheme not in ("http", "https") or not parts.hostname or not port:
        raise ConfigError(f"field 'kube_api_address': expected https://HOST:PORT, got {address!r}")
    return KubeEndpoint(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        token_path=config.kube_token_path,
        ca_path=config.kube_root_ca,
    )


class KubeStatusError(KubeError):
    """A watch answered with an HTTP error status (410 Gone: relist)."""

    def __init__(self, message: str, response: ApiResponse) -> None:
        super().__init__(message)
        self.response = response

    @property
    def status(self) -> int:
        return self.response.status


class _BadResponse(Exception):
    """The peer's bytes are not an HTTP response we can read."""


class KubeClient:
    """The agent's `KubeApi` against a real API server."""

    def __init__(
        self,
        endpoint: KubeEndpoint,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        watch_idle_timeout: float = WATCH_IDLE_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.watch_idle_timeout = watch_idle_timeout

    # -- the calls the agent makes -------------------------------------------------

    async def get_pod(self, namespace: str, name: str) -> ApiResponse:
        return await self.request("GET", _pod_path(namespace, name))

    async def patch_pod(self, namespace: str, name: str, patch: Mapping[str, Any]) -> ApiResponse:
        return await self.request("PATCH", _pod_path(namespace, name), patch, MERGE_PATCH)

    async def get_daemonset(self, namespace: str, name: str) -> ApiResponse:
        return await self.request(
            "GET",
            f"/apis/apps/v1/namespaces/{quote(namespace, safe='')}/daemonsets/"
            f"{quote(name, safe='')}",
        )

    async def list(self, path: str, params: Mapping[str, str] | None = None) -> ApiResponse:
        """A LIST (GET of a collection); the items and metadata.resourceVersion are in the body."""
        return await self.request("GET", _with_query(path, params), max_body=MAX_LIST_BODY)

    async def watch(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The events of a WATCH of `path`, one decoded JSON object per line, until
        the server ends the stream. Raises KubeError when the connection fails or
        stays silent for `watch_idle_timeout`, KubeStatusError on an HTTP error."""
        target = _with_query(path, {**(params or {}), "watch": "1"})
        what = f"GET {self.endpoint.url}{target}"
        token, context = await asyncio.to_thread(self._credentials, what)
        request = self._request_bytes("GET", target, token, None, "")
        with _reasons(what, self.timeout):
            async with asyncio.timeout(self.timeout):
                reader, writer = await self._send(request, context)
        try:
            with _reasons(what, self.timeout):
                async with asyncio.timeout(self.timeout):
                    status, headers = await _read_head(reader)
                    if not 200 <= status < 300:
                        answer = ApiResponse(status, _decode(await _read_body(reader, headers)))
                        raise KubeStatusError(f"{what}: {answer.describe()}", answer)
            chunks = _chunks(reader, headers)
            pending = b""
            while True:
                # Each read has its own deadline, never one across a `yield`: the
                # consumer may take its time between events.
                with _reasons(what, self.watch_idle_timeout, idle=True):
                    async with asyncio.timeout(self.watch_idle_timeout):
                        chunk = await anext(chunks, None)
                if chunk is None:
                    return
                pending += chunk
                if len(pending) > MAX_BODY:
                    raise KubeError(f"{what}: a watch event larger than {MAX_BODY} bytes")
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _event(what, line)
        finally:
            # One request per connection, and a watch we stop reading is abandoned.
            writer.transport.abort()

    # -- HTTP -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        *,
        max_body: int = MAX_BODY,
    ) -> ApiResponse:
        """One call; any HTTP answer is returned, no answer raises KubeError."""
        what = f"{method} {self.endpoint.url}{path}"
        token, context = await asyncio.to_thread(self._credentials, what)
        request = self._request_bytes(method, path, token, body, content_type)
        with _reasons(what, self.timeout):
            async with asyncio.timeout(self.timeout):
                return await self._exchange(request, context, max_body)

    def _request_bytes(
        self,
        method: str,
        path: str,
        token: str,
        body: Mapping[str, Any] | None,
        content_type: str,
    ) -> bytes:
        payload = b"" if body is None else json.dumps(body).encode()
        head = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.endpoint.url.split('://', 1)[1]}",
            f"User-Agent: {USER_AGENT}",
            "Accept: application/json",
            "Connection: close",
        ]
        if token:
            head.append(f"Authorization: Bearer {token}")
        if body is not None:
            head += [f"Content-Type: {content_type}", f"Content-Length: {len(payload)}"]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + payload

    def _credentials(self, what: str) -> tuple[str, ssl.SSLContext | None]:
        """The token and TLS context, read from their files for every call: the
        kubelet rotates the token, and a few calls make this cheap (on a thread)."""
        endpoint = self.endpoint
        try:
            token = Path(endpoint.token_path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KubeError(
                f"{what}: cannot read token {endpoint.token_path}: {exc.strerror or exc}"
            ) from None
        if endpoint.scheme != "https":
            return token, None
        try:
            return token, ssl.create_default_context(cafile=endpoint.ca_path)
        except (OSError, ssl.SSLError) as exc:
            detail = getattr(exc, "strerror", None) or exc
            raise KubeError(f"{what}: cannot load CA {endpoint.ca_path}: {detail}") from None

    async def _send(
        self, request: bytes, context: ssl.SSLContext | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(
            self.endpoint.host,
            self.endpoint.port,
            ssl=context,
            server_hostname=self.endpoint.host if context else None,
        )
        try:
            writer.write(request)
            await writer.drain()
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer

    async def _exchange(
        self, request: bytes, context: ssl.SSLContext | None, max_body: int
    ) -> ApiResponse:
        reader, writer = await self._send(request, context)
        try:
            status, headers = await _read_head(reader)
            raw = await _read_body(reader, headers, max_body)
        finally:
            # One request per connection: nothing to shut down gracefully.
            writer.transport.abort()
        return ApiResponse(status, _decode(raw))


@contextlib.contextmanager
def _reasons(what: str, timeout: float, *, idle: bool = False) -> Iterator[None]:
    """Turn what can go wrong on the wire into a KubeError naming the call."""
    try:
        yield
    except TimeoutError:
        if idle:
            raise KubeError(f"{what}: watch silent for {timeout:g} s") from None
        raise KubeError(f"{what}: no answer within {timeout:g} s") from None
    except ssl.SSLError as exc:
        raise KubeError(f"{what}: TLS: {exc.reason or exc}") from None
    except OSError as exc:
        raise KubeError(f"{what}: {_os_reason(exc)}") from None
    except _BadResponse as exc:
        raise KubeError(f"{what}: {exc}") from None


def _with_query(path: str, params: Mapping[str, str] | None) -> str:
    return f"{path}?{urlencode(dict(params))}" if params else path


def _event(what: str, line: bytes) -> dict[str, Any]:
    """One watch line; a line that is not a JSON object means the stream is unreadable."""
    try:
        value = json.loads(line)
    except ValueError:
        raise KubeError(f"{what}: a watch line is not JSON: {line[:80]!r}") from None
    if not isinstance(value, dict):
        raise KubeError(f"{what}: a watch line is not a JSON object: {line[:80]!r}")
    return value


def _os_reason(exc: OSError) -> str:
    """`Connection refused`, not asyncio's `Connect call failed (...)`."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        raise _BadResponse("connection closed before a response") from None
    except asyncio.LimitOverrunError:
        raise _BadResponse("response headers too large") from None
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _BadResponse(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(
    reader: asyncio.StreamReader, headers: Mapping[str, str], max_body: int = MAX_BODY
) -> bytes:
    if "content-length" in headers and "chunked" not in headers.get("transfer-encoding", ""):
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise _BadResponse("malformed response framing") from None
        if length > max_body:
            raise _BadResponse(f"response body of {length} bytes is too large")
    body = bytearray()
    async for chunk in _chunks(reader, headers):
        body += chunk
        if len(body) > max_body:
            raise _BadResponse("response body too large")
    return bytes(body)


async def _chunks(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive, whatever the framing."""
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    return
                if size > MAX_LIST_BODY:
                    raise _BadResponse("response chunk too large")
                yield await reader.readexactly(size)
                if await reader.readexactly(2) != b"\r\n":
                    raise _BadResponse("malformed chunk")
        elif "content-length" in headers:
            yield await reader.readexactly(int(headers["content-length"]))
        else:
            while chunk := await reader.read(65536):  # Connection: close: ends at EOF
                yield chunk
    except asyncio.IncompleteReadError:
        raise _BadResponse("connection closed in the middle of the response body") from None
    except asyncio.LimitOverrunError:
        raise _BadResponse("malformed response framing") from None
    except ValueError:
        raise _BadResponse("malformed response framing") from None


def _decode(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {"message": raw.decode("utf-8", "replace").strip()[:200]}
    return value if isinstance(value, dict) else {"message": str(value)[:200]}
