"""The peak phase's inventory logic, pure: who has a product in their cart (from cart events), which
stock thresholds a `stock_changed` event crosses downwards, and when a product is sold out. The
match stage applies it (connectors.inventory keeps carts and live stock in Redis)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from schemas.models import Event

STOCK_CHANGED = "stock_changed"
# Event types that put a product into a user's cart, and those that take it out (paid or removed).
CART_ADDS = frozenset({"cart_add"})
CART_REMOVALS = frozenset({"cart_remove", "order_paid"})


@dataclass(frozen=True)
class CartChange:
    product_id: str
    user_id: str
    in_cart: bool


@dataclass(frozen=True)
class StockChange:
    product_id: str
    stock: int
    event_id: str


def inventory_change(event: Event) -> CartChange | StockChange | None:
    """What an event changes in carts or stock; None for events that have nothing to do with them.

    A cart event without a product id changes nothing (an order_paid may be for a whole order); a
    stock_changed event without a usable product id or stock is bad input and raises ValueError."""
    if event.event_type in CART_ADDS or event.event_type in CART_REMOVALS:
        product = event.properties.get("product_id")
        if product in (None, ""):
            return None
        return CartChange(str(product), event.user_id, event.event_type in CART_ADDS)
    if event.event_type != STOCK_CHANGED:
        return None
    product, stock = event.properties.get("product_id"), event.properties.get("stock")
    if product in (None, ""):
        raise ValueError(f"{STOCK_CHANGED} {event.event_id}: no product_id")
    if isinstance(stock, bool) or not isinstance(stock, int | float) or stock != int(stock) or stock < 0:
        raise ValueError(f"{STOCK_CHANGED} {event.event_id}: stock must be a whole number ≥ 0, got {stock!r}")
    return StockChange(str(product), int(stock), event.event_id)


def crossed(previous: int | None, current: int, thresholds: Sequence[int]) -> int | None:
    """The lowest threshold the stock fell to or below with this change (previous > t ≥ current),
    or None: nothing newly crossed, a rise, or a sell-out (stock 0 tells no one "only 0 left").

    Only the lowest one, so one big drop (25 → 4 past 20, 10 and 5) is one push, not three. A product
    seen for the first time (previous None) counts as coming from above: its carters hear once."""
    if current <= 0:
        return None
    newly = [t for t in thresholds if current <= t and (previous is None or previous > t)]
    return min(newly, default=None)


def sold_out(stock: int | None) -> bool:
    """No stock recorded means nothing is known to have sold out: the message goes."""
    return stock is not None and stock <= 0


def sold_out_reason(product_id: str) -> str:
    return f"sold out: {product_id}"


def threshold_event_id(product_id: str, threshold: int) -> str:
    """The trigger of every carter's message at one threshold: with it the message id is the same
    per (campaign, user, product, threshold), however often the stock crosses that threshold."""
    return f"{STOCK_CHANGED}:{product_id}:{threshold}"
