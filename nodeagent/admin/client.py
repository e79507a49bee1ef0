"""A small blocking client for the admin API, used by the node-level CLI.

An agent is addressed by a Unix socket path or an `http://host:port` URL;
in a sandbox, by sandbox and node name (`nodeagent.sandbox.state.admin_socket`). Failures
become `AdminError` with one line meant for a human: which agent could not
be reached, or what it answered.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlencode, urlsplit

DEFAULT_TIMEOUT_S = 10.0


class AdminError(Exception):
    """The agent could not be reached, or answered with an error (`status` then set)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Talks to one agent's admin API."""

    def __init__(self, target: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not target:
            raise ValueError("empty agent address")
        self.target = target
        self.timeout = timeout
        if target.startswith(("http://", "https://")):
            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                raise ValueError(f"agent URL {target!r} must be http://HOST:PORT")
            self._host = url.hostname
            self._port = url.port or 15000
            self._unix: str | None = None
        else:
            self._unix = target

    def _connection(self) -> http.client.HTTPConnection:
        if self._unix is not None:
            return _UnixHTTPConnection(self._unix, self.timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def request(self, method: str, path: str, params: dict[str, str] | None = None) -> str:
        """Send one request; the body text on 2xx, AdminError otherwise."""
        target = path + ("?" + urlencode(params) if params else "")
        conn = self._connection()
        try:
            conn.request(method, target)
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
        except FileNotFoundError:
            raise AdminError(f"cannot reach agent at {self.target}: no such socket") from None
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise AdminError(f"cannot reach agent at {self.target}: {reason}") from None
        finally:
            conn.close()
        if resp.status >= 300:
            first = body.strip().splitlines()[0] if body.strip() else resp.reason
            raise AdminError(first, status=resp.status)
        return body

    def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        body = self.request("GET", path, params)
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise AdminError(f"agent at {self.target} sent invalid JSON for {path}") from None

    def config_dump(self) -> dict[str, Any]:
        data = self.get_json("/config_dump")
        if not isinstance(data, dict):
            raise AdminError(f"agent at {self.target} sent a config dump that is not an object")
        return data

    def connections(self) -> list[dict[str, Any]]:
        return list(self.get_json("/connections"))

    def pods(self) -> list[dict[str, Any]]:
        return list(self.get_json("/pods"))

    def rules(self, pod: str) -> dict[str, Any]:
        return dict(self.get_json("/rules", {"pod": pod}))

    def explain(self, from_pod: str, to: str) -> dict[str, Any]:
        return dict(self.get_json("/explain", {"from": from_pod, "to": to}))

    def routes(self) -> dict[str, Any]:
        data = self.get_json("/routes")
        if not isinstance(data, dict):
            raise AdminError(f"agent at {self.target} sent routes that are not an object")
        return data

    def release(self, pod: str) -> str:
        return self.request("POST", "/release", {"pod": pod}).strip()

    def logging(self, level: str | None = None, reset: bool = False) -> str:
        params = {"reset": ""} if reset else ({"level": level} if level is not None else None)
        return self.request("POST", "/logging", params).strip()
