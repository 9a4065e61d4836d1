"""The event-plane interface: fire-and-forget pub/sub of byte payloads on dotted subjects.

Every backend (memory, NATS, ZMQ) implements :class:`EventPlane`. Contract, shared by all:

- ``start()`` connects; call it before :meth:`~EventPlane.publish` or
  :meth:`~EventPlane.subscribe` (they raise :class:`RuntimeError` before it).
- ``publish(subject, payload)`` never blocks and never raises for transport trouble: it hands
  the message to the backend (or counts it in ``dropped`` when the backend cannot take it).
  Messages of one plane on one subject reach each subscriber in publish order. Delivery is
  at most once: a subscriber that is slow, disconnected or not yet connected misses messages
  (core NATS semantics). Call it from the loop that called ``start()``.
- ``subscribe(subject)`` returns a :class:`Subscription` at once. ``await sub.ready()`` waits
  until the backend registered it, so that messages published afterwards are delivered (as
  far as the backend can tell: see each backend's notes). Subjects are dot-separated tokens;
  a ``*`` token matches any one token and a final ``>`` token matches one or more tokens
  (NATS semantics: ``a.>`` matches ``a.b`` and ``a.b.c`` but not ``a``).
- ``prepare_publish(subject)`` gets a publisher ready before its first message (the ZMQ
  plane announces the subject's channel, so subscribers connect before events flow).
- ``flush()`` waits until everything published so far was handed to the transport.
- ``close()`` ends every subscription of this plane (their iterators stop) and releases the
  transport. It is idempotent; ``publish`` after it is dropped silently (shutdown races),
  ``subscribe`` raises.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import NamedTuple, Self

__all__ = [
    "DEFAULT_MAX_PENDING",
    "EventPlane",
    "Message",
    "SubjectPattern",
    "Subscription",
    "SubscriptionIndex",
    "validate_subject",
]

log = logging.getLogger(__name__)

#: Messages a subscription buffers before it drops new ones (a slow consumer).
DEFAULT_MAX_PENDING = 1 << 20


class Message(NamedTuple):
    """One received message: the concrete subject it was published on, and its payload."""

    subject: str
    payload: bytes


def validate_subject(subject: str, *, wildcards: bool) -> list[str]:
    """Split ``subject`` into tokens; raise :class:`ValueError` if it is not a valid subject.

    Tokens are non-empty and contain no whitespace. With ``wildcards``, a token may be ``*`` and
    the last one ``>``; without, neither may appear (a published subject is concrete).
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject must be a non-empty string, got {subject!r}")
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if not tok or any(c.isspace() for c in tok):
            raise ValueError(f"bad subject {subject!r}: empty token or whitespace")
        if tok in ("*", ">"):
            if not wildcards:
                raise ValueError(f"bad subject {subject!r}: wildcards are for subscribing")
            if tok == ">" and i != len(tokens) - 1:
                raise ValueError(f"bad subject {subject!r}: '>' must be the last token")
    return tokens


class SubjectPattern:
    """A subscription subject, compiled for matching concrete subjects against it."""

    __slots__ = ("exact", "literal_prefix", "subject", "tokens")

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.tokens = validate_subject(subject, wildcards=True)
        self.exact = "*" not in self.tokens and ">" not in self.tokens
        # The text before the first wildcard: every matching subject starts with it (ZMQ's
        # SUB filter is a byte prefix, so this is what the ZMQ plane subscribes to).
        literal: list[str] = []
        for tok in self.tokens:
            if tok in ("*", ">"):
                literal.append("")
                break
            literal.append(tok)
        self.literal_prefix = ".".join(literal)

    def matches(self, subject: str) -> bool:
        if self.exact:
            return subject == self.subject
        if not subject.startswith(self.literal_prefix):
            return False
        stoks = subject.split(".")
        for i, ptok in enumerate(self.tokens):
            if ptok == ">":
                return len(stoks) > i
            if i >= len(stoks) or (ptok != "*" and ptok != stoks[i]):
                return False
        return len(stoks) == len(self.tokens)

    def __repr__(self) -> str:
        return f"SubjectPattern({self.subject!r})"


class Subscription:
    """Messages on one subject (pattern), as an async iterator of :class:`Message`.

    Iteration ends when the subscription or its plane is closed; messages still buffered then
    are discarded. At most ``max_pending`` messages are buffered: beyond that new ones are
    dropped and counted in :attr:`dropped` (a consumer that cannot keep up must not make the
    process run out of memory). Use it from the plane's event loop only.
    """

    def __init__(
        self,
        subject: str,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        on_close: Callable[[Subscription], Awaitable[None]] | None = None,
    ) -> None:
        self.pattern = SubjectPattern(subject)
        self.subject = subject
        #: Messages dropped because the buffer was full.
        self.dropped = 0
        self._max_pending = max_pending
        self._buf: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._on_close = on_close
        # Set by the backend once the transport knows about this subscription.
        self._registered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def closed(self) -> bool:
        return self._closed

    def _deliver(self, msg: Message) -> None:
        """Backend side: buffer ``msg`` and wake the consumer. Never blocks."""
        if self._closed:
            return
        if len(self._buf) >= self._max_pending:
            if self.dropped == 0:
                log.warning("subscription %r is too slow: dropping messages", self.subject)
            self.dropped += 1
            return
        self._buf.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _set_registered(self, exc: BaseException | None = None) -> None:
        if not self._registered.done():
            if exc is None:
                self._registered.set_result(None)
            else:
                self._registered.set_exception(exc)

    async def ready(self) -> None:
        """Wait until the transport registered this subscription (see the backend's notes).

        Raises the backend's error if registration failed, :class:`RuntimeError` if the
        subscription is closed.
        """
        if self._closed:
            raise RuntimeError(f"subscription {self.subject!r} is closed")
        await asyncio.shield(self._registered)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        while not self._buf:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buf.popleft()

    def _end(self) -> None:
        """Stop iteration (backend or plane side); idempotent, no transport work."""
        if self._closed:
            return
        self._closed = True
        self._buf.clear()
        self._set_registered(RuntimeError(f"subscription {self.subject!r} was closed"))
        # Nobody may be awaiting ready(): do not let the exception count as unretrieved.
        self._registered.exception()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def close(self) -> None:
        """Unsubscribe and end iteration. Idempotent."""
        if self._closed:
            return
        self._end()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            await on_close(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._buf)} pending"
        return f"Subscription({self.subject!r}, {state})"


class SubscriptionIndex:
    """Subscriptions by subject: exact ones found by dict lookup, patterns by a scan."""

    def __init__(self) -> None:
        self.exact: dict[str, list[Subscription]] = {}
        self.patterns: list[Subscription] = []

    def add(self, sub: Subscription) -> None:
        if sub.pattern.exact:
            self.exact.setdefault(sub.subject, []).append(sub)
        else:
            self.patterns.append(sub)

    def remove(self, sub: Subscription) -> None:
        if sub.pattern.exact:
            subs = self.exact.get(sub.subject)
            if subs is not None and sub in subs:
                subs.remove(sub)
                if not subs:
                    del self.exact[sub.subject]
        elif sub in self.patterns:
            self.patterns.remove(sub)

    def deliver(self, subject: str, payload: bytes) -> None:
        msg = Message(subject, payload)
        for sub in self.exact.get(subject, ()):
            sub._deliver(msg)
        for sub in self.patterns:
            if sub.pattern.matches(subject):
                sub._deliver(msg)


class EventPlane(abc.ABC):
    """Fire-and-forget pub/sub; see the module docstring for the contract.

    Use as ``async with open_event_plane(url) as plane: ...`` or call :meth:`start` /
    :meth:`close`. ``dropped`` counts published messages the backend could not take.
    """

    def __init__(self) -> None:
        self._started = False
        self._closed = False
        self._subs: set[Subscription] = set()
        #: Published messages the transport could not take (buffer full, disconnected too long).
        self.dropped = 0

    @property
    def started(self) -> bool:
        return self._started

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_usable(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}.{what}() before start()")

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect to the transport. Idempotent."""

    @abc.abstractmethod
    def publish(self, subject: str, payload: bytes) -> None:
        """Send ``payload`` on the concrete ``subject``; never blocks."""

    def prepare_publish(self, subject: str) -> None:
        """Get ready to publish on ``subject`` before the first message, so that subscribers
        can connect in time (the ZMQ plane binds and announces the subject's channel now;
        :meth:`flush` waits for the announcement). A no-op on planes with a server."""
        self._check_usable("prepare_publish")

    @abc.abstractmethod
    def subscribe(self, subject: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """A new :class:`Subscription` to ``subject`` (wildcards allowed)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until every message published so far was handed to the transport."""

    @abc.abstractmethod
    async def close(self) -> None:
        """End all subscriptions and release the transport. Idempotent."""

    def _end_subscriptions(self) -> None:
        subs, self._subs = self._subs, set()
        for sub in subs:
            sub._end()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
