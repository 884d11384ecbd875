"""Provider sandboxes on loopback: the adapters are pointed at them by configuration only.

`python -m connectors.channels.sandboxes` (or `loopcast sandbox up`) serves every sandbox on
one port, each under its provider's path.
"""

from __future__ import annotations

from aiohttp import web

from connectors.channels.sandboxes import webhook
from connectors.channels.sandboxes.core import Sandbox, inspection_routes
from infra.settings import Settings


def build_app(settings: Settings) -> tuple[web.Application, dict[str, Sandbox]]:
    boxes = {"webhook": Sandbox("webhook")}
    app = web.Application()
    app.add_routes(inspection_routes(boxes))
    app.add_routes(
        webhook.routes(
            boxes["webhook"], settings.webhook_secret.get_secret_value(), f"{settings.http_base}/receipts/webhook"
        )
    )

    async def close(_: web.Application) -> None:
        for box in boxes.values():
            await box.close()

    app.on_cleanup.append(close)
    return app, boxes


def main() -> None:
    settings = Settings()
    app, _ = build_app(settings)
    web.run_app(app, host=settings.host, port=settings.sandbox_port, access_log=None, print=None)


if __name__ == "__main__":
    main()
