"""Sandbox for APNs: a real HTTP/2-over-TLS server (h2 state machine, ALPN "h2", a self-signed certificate the
adapter trusts through options.ca_file) on sandbox_port + 2, plus the same handler under /apns over HTTP/1.1
for clients that cannot speak HTTP/2 (real APNs refuses HTTP/1.1; only the HTTP/2 port is faithful).

Conventions: a device token of 64 zeros is answered 410 Unregistered (the app was removed).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import re
import ssl
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from connectors.channels.devkeys import dev_private_key, public_key_pem
from connectors.channels.sandboxes.core import Sandbox, SandboxContext

PORT_OFFSET = 2
DEVICE_TOKEN = re.compile(r"^[0-9a-fA-F]{64}$")
UNREGISTERED = "0" * 64

Answer = tuple[int, dict[str, str], bytes]


def h2_port(settings) -> int:
    return settings.sandbox_port + PORT_OFFSET


def certificate_path(home: Path) -> Path:
    """The sandbox's self-signed TLS certificate (for 127.0.0.1 and localhost), created once."""
    path = home / "dev-keys" / "apns-sandbox-cert.pem"
    if path.exists():
        return path
    key = serialization.load_pem_private_key(dev_private_key(home, "apns-sandbox-tls", "ec").encode(), None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loopcast apns sandbox")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    try:
        os.link(tmp, path)  # another process got there first: theirs wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path


def _error(status: int, reason: str, **extra: object) -> Answer:
    return status, {"content-type": "application/json"}, json.dumps({"reason": reason, **extra}).encode()


def fault_answer(fault: str, status: int) -> web.Response:
    reason = {"throttled": "TooManyRequests", "outage": "ServiceUnavailable"}.get(fault, "InternalServerError")
    return web.json_response({"reason": reason}, status=status)


def handler(
    box: Sandbox, ctx: SandboxContext
) -> Callable[[str, str, Mapping[str, str], bytes, str], Awaitable[Answer]]:
    credentials = ctx.credentials
    public_key = public_key_pem(credentials.auth_key.get_secret_value())

    def authorise(header: str) -> str | None:
        """None when the provider token verifies, else APNs' reason."""
        if not header.lower().startswith("bearer "):
            return "MissingProviderToken"
        token = header[7:]
        try:
            if jwt.get_unverified_header(token).get("kid") != credentials.key_id:
                return "InvalidProviderToken"
            claims = jwt.decode(token, public_key, algorithms=["ES256"], options={"require": ["iss", "iat"]})
        except jwt.InvalidTokenError:
            return "InvalidProviderToken"
        if claims["iss"] != credentials.team_id:
            return "InvalidProviderToken"
        if time.time() - int(claims["iat"]) > 3600:
            return "ExpiredProviderToken"
        return None

    async def handle(method: str, path: str, headers: Mapping[str, str], body: bytes, version: str) -> Answer:
        refused = authorise(headers.get("authorization", ""))
        if refused:
            box.rejected += 1
            return _error(403, refused)
        injected = await box.inject(fault_answer)
        if injected is not None:
            return injected.status, {k.lower(): v for k, v in injected.headers.items()}, injected.body or b""
        match = re.fullmatch(r"/3/device/([^/]*)", path.split("?", 1)[0])
        if match is None:
            return _error(404, "BadPath")
        if method != "POST":
            return _error(405, "MethodNotAllowed")
        device = match.group(1)
        if not headers.get("apns-topic"):
            return _error(400, "MissingTopic")
        if headers.get("apns-push-type", "alert") not in {
            "alert",
            "background",
            "voip",
            "complication",
            "fileprovider",
        }:
            return _error(400, "InvalidPushType")
        if headers.get("apns-priority", "10") not in {"1", "5", "10"}:
            return _error(400, "BadPriority")
        given_id = headers.get("apns-id") or str(uuid.uuid4())
        try:
            uuid.UUID(given_id)
        except ValueError:
            return _error(400, "BadMessageId")
        if not DEVICE_TOKEN.match(device):
            return _error(400, "BadDeviceToken")
        if device == UNREGISTERED:
            return _error(410, "Unregistered", timestamp=int(time.time() * 1000))
        if not body:
            return _error(400, "PayloadEmpty")
        if len(body) > 4096:
            return _error(413, "PayloadTooLarge")
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "BadPayload")  # APNs' wording is looser; the status is what matters
        item = box.record(
            {
                "message_id": payload.get("message_id"),
                "device_token": device,
                "apns_id": given_id,
                "topic": headers["apns-topic"],
                "priority": headers.get("apns-priority", "10"),
                "push_type": headers.get("apns-push-type"),
                "expiration": headers.get("apns-expiration"),
                "http_version": version,
                "payload": payload,
            },
            None,
        )
        item.provider_message_id = given_id  # APNs answers with the request's apns-id
        return 200, {"apns-id": given_id}, b""

    return handle


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    handle = handler(box, ctx)

    async def http1(request: web.Request) -> web.Response:
        status, headers, body = await handle(
            request.method, "/3/device/" + request.match_info["token"], request.headers, await request.read(), "1.1"
        )
        return web.Response(status=status, headers=headers, body=body or None)

    return [web.route("*", "/3/device/{token}", http1)]


class _H2Server(asyncio.Protocol):
    """One HTTP/2 connection: frames in, a task per completed request stream, frames out."""

    def __init__(self, handle, connections: set) -> None:
        self.handle, self.connections = handle, connections
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.connections.add(self)
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        for task in self.tasks:
            task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = (dict(event.headers), bytearray())
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id in self.streams:
                    self.streams[event.stream_id][1].extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.streams:
                headers, body = self.streams.pop(event.stream_id)
                task = asyncio.ensure_future(self._respond(event.stream_id, headers, bytes(body)))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.close()
        self._flush()

    async def _respond(self, stream_id: int, headers: dict[str, str], body: bytes) -> None:
        status, answer_headers, answer = await self.handle(
            headers.get(":method", ""), headers.get(":path", ""), headers, body, "2"
        )
        fields = [(":status", str(status)), *((k, v) for k, v in answer_headers.items() if k != "content-length")]
        fields.append(("content-length", str(len(answer))))
        try:
            self.conn.send_headers(stream_id, fields, end_stream=not answer)
            if answer:
                self.conn.send_data(stream_id, answer, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return  # the client gave up on this stream (its timeout)
        self._flush()

    def _flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())


async def serve(box: Sandbox, ctx: SandboxContext) -> Callable[[], Awaitable[None]]:
    """The faithful transport: HTTP/2 over TLS on sandbox_port + 2."""
    home = ctx.settings.home
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certificate_path(home), keyfile=home / "dev-keys" / "apns-sandbox-tls.pem")
    tls.set_alpn_protocols(["h2"])
    handle, connections = handler(box, ctx), set()
    server = await asyncio.get_running_loop().create_server(
        lambda: _H2Server(handle, connections), ctx.settings.host, h2_port(ctx.settings), ssl=tls
    )

    async def close() -> None:
        server.close()
        for connection in list(connections):
            if connection.transport is not None:
                connection.transport.close()
        await server.wait_closed()

    return close
