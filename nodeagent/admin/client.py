"""A small blocking client for the admin API, used by the node-level CLI.

An agent is addressed by a Unix socket path or an `http://host:port` URL;
in a sandbox, by sandbox and node name (`nodeagent.sandbox.state.admin_socket`). A
waypoint, which serves `/routes` on its metrics port, by URL; with `opener`, the TCP
socket comes from a factory (one made inside the waypoint's network namespace), so the
client never knows which namespace it talks into. Failures become `AdminError` with one
line meant for a human: which agent (or waypoint) could not be reached, or what it answered.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_ADMIN_PORT = 15000
WAYPOINT_ADMIN_PORT = 15020  # the waypoint serves /routes beside /metrics

SocketOpener = Callable[[], socket.socket]  # an unconnected TCP socket (in some namespace)


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


class _OpenerHTTPConnection(http.client.HTTPConnection):
    """TCP to host:port over a socket from `opener` (made in another network namespace)."""

    def __init__(self, host: str, port: int, opener: SocketOpener, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._opener = opener

    def connect(self) -> None:
        sock = self._opener()
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Talks to one agent's admin API (or a waypoint's `/routes`).

    `what` names the peer in errors ("agent", "waypoint"); `label` is how it is named
    (default: the target); `default_port` completes a URL without a port; `opener` makes
    the socket for an http:// target (default: a plain socket of this namespace)."""

    def __init__(
        self,
        target: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        what: str = "agent",
        label: str = "",
        default_port: int = DEFAULT_ADMIN_PORT,
        opener: SocketOpener | None = None,
    ) -> None:
        if not target:
            raise ValueError(f"empty {what} address")
        self.target = target
        self.timeout = timeout
        self.what = what
        self.label = label or target
        self._opener = opener
        if target.startswith(("http://", "https://")):
            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                raise ValueError(f"{what} URL {target!r} must be http://HOST:PORT")
            self._host = url.hostname
            try:
                self._port = url.port or default_port
            except ValueError:
                raise ValueError(f"{what} URL {target!r}: bad port") from None
            self._unix: str | None = None
        elif opener is not None:
            raise ValueError(f"{what} address {target!r}: a socket opener needs http://HOST:PORT")
        else:
            self._unix = target

    def _connection(self) -> http.client.HTTPConnection:
        if self._unix is not None:
            return _UnixHTTPConnection(self._unix, self.timeout)
        if self._opener is not None:
            return _OpenerHTTPConnection(self._host, self._port, self._opener, self.timeout)
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
            raise AdminError(f"cannot reach {self.what} at {self.label}: no such socket") from None
        except (OSError, http.client.HTTPException, RuntimeError) as exc:
            # RuntimeError: the opener could not enter the namespace (it is gone).
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise AdminError(f"cannot reach {self.what} at {self.label}: {reason}") from None
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
            raise AdminError(f"{self.what} at {self.label} sent invalid JSON for {path}") from None

    def config_dump(self) -> dict[str, Any]:
        data = self.get_json("/config_dump")
        if not isinstance(data, dict):
            raise AdminError(
                f"{self.what} at {self.label} sent a config dump that is not an object"
            )
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
        try:
            data = self.get_json("/routes")
        except AdminError as exc:
            if exc.status != 404:
                raise
            # A waypoint (or agent) built without the routes view: say so, not "no such endpoint".
            raise AdminError(
                f"{self.what} at {self.label} does not serve /routes ({exc})", status=404
            ) from None
        if not isinstance(data, dict):
            raise AdminError(f"{self.what} at {self.label} sent routes that are not an object")
        return data

    def release(self, pod: str) -> str:
        return self.request("POST", "/release", {"pod": pod}).strip()

    def logging(self, level: str | None = None, reset: bool = False) -> str:
        params = {"reset": ""} if reset else ({"level": level} if level is not None else None)
        return self.request("POST", "/logging", params).strip()
