"""The coordinator's public address: a reverse proxy that passes only Flower's Fleet API to the SuperLink.

Flower 1.42 serves its Fleet API (what SuperNodes use), its Control API (submit, stop and list runs; register
and unregister site keys; read logs) and its Runtime API (what ServerApps and SuperExec use) over HTTP(S) on
one listening socket, and the open-source SuperLink has no login on the Control API (account authentication
is an enterprise plugin; ``--fleet-api-address``/``--control-api-address`` are deprecated no-ops). Whoever
reaches that socket with the CA certificate could therefore run code at every site. fedpath keeps the
SuperLink on 127.0.0.1 (operators run `fedpath run`, `fedpath deploy register` and `flwr` on the coordinator
itself) and puts this gateway on the public address: it terminates TLS with the coordinator's certificate and
forwards ``POST /v1/fleet/<method>`` and ``GET /health`` to the SuperLink, and answers everything else with
403, logged with the caller's address.

Run by `fedpath server start` (``python -m fedpath.server.gateway``), served by uvicorn; the upstream is
verified with the consortium CA (the coordinator certificate is valid for 127.0.0.1).
"""

from __future__ import annotations

import argparse
import logging
import re
import ssl
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("fedpath.gateway")

# One Fleet method name per request: no other prefix, no dot segments, no percent-encoding, no query.
FLEET_PATH = re.compile(r"^/v1/fleet/[a-z][a-z0-9-]{0,63}$")
HEALTH_PATH = "/health"
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy sets itself.
DROPPED_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
MAX_BODY = 64 * 1024 * 1024  # Flower sends arrays in 5 MB chunks; anything far larger is not Fleet traffic
REFUSAL = (
    b'{"detail": "this address serves only the Fleet API (sites); run operator commands on the coordinator '
    b'itself, against its local SuperLink address"}'
)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def allowed(method: str, path: str, query: bytes) -> bool:
    """True for the requests a SuperNode makes: POST to a Fleet method, GET of the health check."""
    if query:
        return False
    if method == "GET" and path == HEALTH_PATH:
        return True
    return method == "POST" and FLEET_PATH.match(path) is not None


class FleetGateway:
    """ASGI application forwarding allowed requests to `upstream` (``https://127.0.0.1:PORT``)."""

    def __init__(self, upstream: str, *, verify: ssl.SSLContext | bool) -> None:
        self.upstream = upstream.rstrip("/")
        self.client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(120.0, connect=10.0))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        raw_path = scope.get("raw_path") or path.encode()
        client = scope.get("client") or ("?", 0)
        if raw_path != path.encode() or not allowed(method, path, scope.get("query_string", b"")):
            log.warning("refused %s %s from %s (not the Fleet API)", method, path[:200], client[0])
            await _respond(send, 403, REFUSAL, b"application/json")
            return
        body = await _read_body(receive)
        if body is None:
            await _respond(send, 413, b'{"detail": "request too large"}', b"application/json")
            return
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in DROPPED_HEADERS
        ]
        headers.append(("x-forwarded-for", str(client[0])))
        try:
            reply = await self.client.request(method, self.upstream + path, content=body, headers=headers)
        except httpx.HTTPError as err:
            log.error("SuperLink unreachable for %s: %s", path, err)
            await _respond(send, 502, b'{"detail": "coordinator not ready"}', b"application/json")
            return
        out_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in reply.headers.items()
            if k.lower() not in DROPPED_HEADERS
        ]
        await send({"type": "http.response.start", "status": reply.status_code, "headers": out_headers})
        await send({"type": "http.response.body", "body": reply.content})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def gateway_command(
    *, host: str, port: int, upstream_port: int, tls: tuple[Path, Path, Path] | None
) -> list[str]:
    """The command line `fedpath server start` runs: this module under this interpreter."""
    cmd = [sys.executable, "-m", "fedpath.server.gateway", "--host", host, "--port", str(port)]
    cmd += ["--upstream-port", str(upstream_port)]
    if tls is None:
        return [*cmd, "--insecure"]
    ca, cert, key = tls
    return [*cmd, "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m fedpath.server.gateway",
        description="Serve only Flower's Fleet API on the public address; forward it to the local SuperLink.",
    )
    p.add_argument("--host", default="0.0.0.0", help="public interface")
    p.add_argument("--port", type=int, default=8000, help="public port (the sites connect here)")
    p.add_argument("--upstream-port", type=int, required=True, help="the SuperLink's port on 127.0.0.1")
    p.add_argument("--insecure", action="store_true", help="plain text on both sides (tests only)")
    p.add_argument("--ssl-ca-certfile", type=Path, help="consortium CA (verifies the SuperLink)")
    p.add_argument("--ssl-certfile", type=Path, help="coordinator certificate (PEM)")
    p.add_argument("--ssl-keyfile", type=Path, help="coordinator private key (PEM)")
    args = p.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.insecure:
        app = FleetGateway(f"http://127.0.0.1:{args.upstream_port}", verify=False)
        ssl_options: dict[str, Any] = {}
    else:
        if not (args.ssl_ca_certfile and args.ssl_certfile and args.ssl_keyfile):
            p.error("give --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile, or --insecure")
        verify = ssl.create_default_context(cafile=str(args.ssl_ca_certfile))
        app = FleetGateway(f"https://127.0.0.1:{args.upstream_port}", verify=verify)
        ssl_options = {"ssl_certfile": str(args.ssl_certfile), "ssl_keyfile": str(args.ssl_keyfile)}
    log.info(
        "Fleet gateway on %s:%d -> SuperLink 127.0.0.1:%d (only /v1/fleet/* and /health pass)",
        args.host,
        args.port,
        args.upstream_port,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, **ssl_options)


if __name__ == "__main__":
    main()
