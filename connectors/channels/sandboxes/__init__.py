"""Provider sandboxes on loopback: the adapters are pointed at them by configuration only.

Every registered provider has a module here named after its scheme ("aliyun-sms" →
aliyun_sms.py) with `routes(box, ctx)`, served under /<scheme>/ on one port, so a channel's
`url` of http://127.0.0.1:<sandbox port>/<scheme> stands in for the provider's API root. A
provider that is not HTTP (SMTP) may also define `async serve(box, ctx)`, returning an async
close callable. `python -m connectors.channels.sandboxes` (or `loopcast sandbox up`) serves all.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterable

from aiohttp import web

from connectors.channels.base import REGISTRY, adapter_class
from connectors.channels.sandboxes.core import Sandbox, SandboxContext, inspection_routes
from infra.eventloop import use_fast_loop
from infra.settings import Settings


def module_for(scheme: str):
    return importlib.import_module(f"connectors.channels.sandboxes.{scheme.replace('-', '_')}")


def context_for(scheme: str, settings: Settings) -> SandboxContext:
    cls = adapter_class(scheme)
    return SandboxContext(
        scheme=scheme,
        credentials=cls.credentials_from(settings),
        receipt_url=f"{settings.http_base}/receipts/{scheme}",
        settings=settings,
    )


def build_app(
    settings: Settings, schemes: Iterable[str] | None = None, *, llm: bool | None = None
) -> tuple[web.Application, dict[str, Sandbox]]:
    """Every provider's sandbox (or those of `schemes`), and the LLM endpoint under /llm (by default only when
    serving every provider)."""
    chosen = sorted(schemes if schemes is not None else REGISTRY)
    boxes = {scheme: Sandbox(scheme) for scheme in chosen}
    app = web.Application(client_max_size=16 * 1024 * 1024)
    if llm if llm is not None else schemes is None:
        from connectors import llm_sandbox  # imports the copy stages: only where it is served

        box = boxes[llm_sandbox.NAME] = Sandbox(llm_sandbox.NAME)
        sub = web.Application(client_max_size=16 * 1024 * 1024)
        sub.add_routes(llm_sandbox.routes(box, llm_sandbox.context(settings)))
        app.add_subapp(f"/{llm_sandbox.NAME}", sub)
    app.add_routes(inspection_routes(boxes))
    closers = []
    for scheme in chosen:
        module, ctx = module_for(scheme), context_for(scheme, settings)
        sub = web.Application(client_max_size=16 * 1024 * 1024)
        sub.add_routes(module.routes(boxes[scheme], ctx))
        app.add_subapp(f"/{scheme}", sub)
        if hasattr(module, "serve"):

            async def start(_: web.Application, module=module, box=boxes[scheme], ctx=ctx) -> None:
                closers.append(await module.serve(box, ctx))

            app.on_startup.append(start)

    async def close(_: web.Application) -> None:
        for closer in closers:
            await closer()
        for box in boxes.values():
            await box.close()

    app.on_cleanup.append(close)
    return app, boxes


def main() -> None:
    use_fast_loop()
    settings = Settings()
    app, _ = build_app(settings)
    # Start-up's objects out of the collector's sight: a full collection then walks only what arrived,
    # and a provider's answer is not held up by one walking the whole process.
    gc.collect()
    gc.freeze()
    web.run_app(app, host=settings.host, port=settings.sandbox_port, access_log=None, print=None)


if __name__ == "__main__":
    main()
