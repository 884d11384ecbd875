"""HTTP/2 over TLS for the sandboxes whose providers speak it (APNs, FCM): a server on the h2 state machine
(ALPN "h2"), each on its own port beside the sandbox's HTTP/1.1 one, and the self-signed certificate (for
127.0.0.1 and localhost) that adapters trust through their channel option `ca_file`.

A provider's handler is one function of (method, path, headers, body, http version, connection id) giving
(status, headers, body), so its HTTP/1.1 route and its HTTP/2 server share every rule.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import itertools
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from connectors.channels.devkeys import dev_private_key
from connectors.channels.sandboxes.core import server_closer

KEY_NAME = "sandbox-tls"

Answer = tuple[int, dict[str, str], bytes]
# (method, path, headers with lower-case names, body, "2" or "1.1", connection id or None) → answer
Handle = Callable[[str, str, Mapping[str, str], bytes, str, str | None], Awaitable[Answer]]


def certificate_path(home: Path) -> Path:
    """The sandboxes' self-signed TLS certificate (for 127.0.0.1 and localhost), created once; it is its own CA,
    so a channel's `ca_file` names this file."""
    path = home / "dev-keys" / f"{KEY_NAME}-cert.pem"
    if path.exists():
        return path
    key = serialization.load_pem_private_key(dev_private_key(home, KEY_NAME, "ec").encode(), None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loopcast sandbox")])
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


def answer_of(response: web.Response) -> Answer:
    """An aiohttp response (what `Sandbox.inject` renders a fault as) as a handler's answer."""
    return response.status, {k.lower(): v for k, v in response.headers.items()}, response.body or b""


def http1_response(answer: Answer) -> web.Response:
    status, headers, body = answer
    return web.Response(status=status, headers=headers, body=body or None)


class H2Server(asyncio.Protocol):
    """One HTTP/2 connection: frames in, a task per completed request stream, frames out."""

    def __init__(self, handle: Handle, connections: set[H2Server], connection_id: str) -> None:
        self.handle, self.connections, self.id = handle, connections, connection_id
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
            headers.get(":method", ""), headers.get(":path", ""), headers, body, "2", self.id
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


async def serve(handle: Handle, settings, offset: int) -> Callable[[], Awaitable[None]]:
    """`handle` over HTTP/2 + TLS on sandbox_port + `offset`; returns the async close callable a sandbox's
    `serve` hook hands back."""
    home = settings.home
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certificate_path(home), keyfile=home / "dev-keys" / f"{KEY_NAME}.pem")
    tls.set_alpn_protocols(["h2"])
    connections: set[H2Server] = set()
    ids = itertools.count(1)  # a connection's id is recorded with each request it carried
    server = await asyncio.get_running_loop().create_server(
        lambda: H2Server(handle, connections, f"h2-{next(ids)}"), settings.host, settings.sandbox_port + offset, ssl=tls
    )

    return server_closer(server, connections)
