"""In-process event plane (``memory://[NAME]``): tests and single-process deployments.

Every :class:`MemoryEventPlane` opened with the same name in one process shares one bus.
``publish`` delivers synchronously into each matching subscription's buffer, so ordering is
exact (across planes too) and a subscription is registered the moment ``subscribe`` returns.
"""

from __future__ import annotations

from .base import DEFAULT_MAX_PENDING, EventPlane, Subscription, SubscriptionIndex

__all__ = ["MemoryEventPlane"]


_buses: dict[str, SubscriptionIndex] = {}


class MemoryEventPlane(EventPlane):
    """In-process :class:`EventPlane`; planes with the same ``name`` see each other."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name
        self._bus = _buses.setdefault(name, SubscriptionIndex())

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("MemoryEventPlane is closed")
        self._started = True

    def publish(self, subject: str, payload: bytes) -> None:
        if self._closed:
            return
        if not self._started:
            raise RuntimeError("MemoryEventPlane.publish() before start()")
        self._bus.deliver(subject, payload)

    def subscribe(self, subject: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_usable("subscribe")
        sub = Subscription(subject, max_pending=max_pending, on_close=self._unsubscribe)
        self._bus.add(sub)
        self._subs.add(sub)
        sub._set_registered()
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        self._bus.remove(sub)
        self._subs.discard(sub)

    async def flush(self) -> None:
        """Nothing to wait for: ``publish`` delivers synchronously."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            self._bus.remove(sub)
        self._end_subscriptions()

    def __repr__(self) -> str:
        return f"MemoryEventPlane({self.name!r})"
