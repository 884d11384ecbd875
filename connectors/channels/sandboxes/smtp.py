"""Sandbox SMTP relay: an aiosmtpd server on the sandbox's loop at sandbox_port + 1 requiring AUTH
(PLAIN/LOGIN, checked against the adapter's credentials; TLS not required on loopback), answering
faults in SMTP's own codes: outage 421, throttling 451 4.7.0, error 554. Faults are decided at the
end of DATA, like a relay's content and rate checks.
"""

from __future__ import annotations

import asyncio
import email
import warnings
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from email.policy import default as default_policy
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from connectors.channels.sandboxes.core import Sandbox, SandboxContext, server_closer

REPLIES = {
    "outage": "421 4.3.2 Service not available, closing transmission channel",
    "throttled": "451 4.7.0 Temporary server error: rate limited, try again later",
    "error": "554 5.3.0 Transaction failed",
}


def smtp_port(settings: Any) -> int:
    return settings.sandbox_port + 1


def _answer(fault: str, status: int) -> web.Response:
    return web.Response(status=status, text=REPLIES[fault])


def parse(raw: bytes) -> dict[str, Any]:
    mail = email.message_from_bytes(raw, policy=default_policy)
    text, html = mail.get_body(("plain",)), mail.get_body(("html",))
    return {
        "message_id": str(mail["Message-ID"] or ""),
        "from": str(mail["From"] or ""),
        "to": str(mail["To"] or ""),
        "subject": str(mail["Subject"] or ""),
        "text": text.get_content() if text is not None else None,
        "html": html.get_content() if html is not None else None,
        "headers": {name: str(value) for name, value in mail.items()},
    }


class Handler:
    def __init__(self, box: Sandbox) -> None:
        self.box = box

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 - aiosmtpd hook
        response = await self.box.inject(_answer)
        if response is not None:
            # A malformed fault: core renders an HTML page; as an SMTP reply it is an unreadable line.
            return response.text if response.content_type == "text/plain" else "<html>502 upstream glitch</html>"
        body = parse(envelope.original_content or b"")
        body["envelope"] = {"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos)}
        item = self.box.record(body, None)
        return f"250 2.0.0 Ok: queued as {item.provider_message_id}"


async def serve(box: Sandbox, ctx: SandboxContext) -> Callable[[], Awaitable[None]]:
    username = ctx.credentials.username.encode()
    password = ctx.credentials.password.get_secret_value().encode()
    handler = Handler(box)
    sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login == username and data.password == password
        if not ok:
            box.rejected += 1
        return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)

    def factory() -> SMTP:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "AUTH without TLS": deliberate, loopback only
            protocol = SMTP(
                handler,
                hostname="sandbox.loopcast.local",
                authenticator=authenticator,
                auth_required=True,
                auth_require_tls=False,
            )
        sessions.add(protocol)
        return protocol

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, ctx.settings.host, smtp_port(ctx.settings))

    return server_closer(server, sessions)


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    """SMTP itself is served by `serve`; over HTTP, the mailboxes and their message counts."""

    async def mailboxes(request: web.Request) -> web.Response:
        counts = Counter(rcpt for item in box.received for rcpt in item.body["envelope"]["rcpt_tos"])
        return web.json_response({"port": smtp_port(ctx.settings), "mailboxes": dict(counts)})

    return [web.get("/mailboxes", mailboxes)]
