"""Runtime ``Context``: stop/kill semantics, event-driven waiting, callbacks, thread safety."""

from __future__ import annotations

import asyncio
import threading

from dynamo_backend_common import Context


async def yield_to_loop(times: int = 3) -> None:
    """Let ready tasks run up to their next real suspension (a yield point, not a timed wait)."""
    for _ in range(times):
        await asyncio.sleep(0)


def test_id_is_kept_or_generated_unique() -> None:
    assert Context("abc").id == "abc"
    ids = {Context().id for _ in range(100)}
    assert len(ids) == 100 and all(ids)


async def test_stop_is_not_kill() -> None:
    ctx = Context()
    assert not ctx.is_stopped() and not ctx.is_killed()
    ctx.stop_generating()
    assert ctx.is_stopped() and not ctx.is_killed()
    ctx.stop_generating()  # idempotent
    assert ctx.is_stopped() and not ctx.is_killed()


async def test_kill_implies_stopped() -> None:
    ctx = Context()
    ctx.kill()
    assert ctx.is_killed() and ctx.is_stopped()
    ctx.kill()
    assert ctx.is_killed() and ctx.is_stopped()


async def test_stop_alias() -> None:
    ctx = Context()
    ctx.stop()
    assert ctx.is_stopped()


async def test_stopped_wakes_every_waiter_without_polling() -> None:
    ctx = Context()
    waiters = [asyncio.ensure_future(ctx.stopped()) for _ in range(3)]
    await yield_to_loop()
    assert not any(w.done() for w in waiters)  # they are parked on the event
    ctx.stop_generating()
    # Woken within a couple of loop iterations: an event, not a polling interval.
    await yield_to_loop()
    assert all(w.done() for w in waiters)


async def test_kill_wakes_both_stopped_and_killed_waiters() -> None:
    ctx = Context()
    stopped = asyncio.ensure_future(ctx.stopped())
    killed = asyncio.ensure_future(ctx.killed())
    await yield_to_loop()
    ctx.stop_generating()
    await yield_to_loop()
    assert stopped.done() and not killed.done()  # a stop is not a kill
    ctx.kill()
    await asyncio.wait_for(killed, 1.0)


async def test_waiting_on_an_already_stopped_context_returns_at_once() -> None:
    ctx = Context()
    ctx.kill()
    await asyncio.wait_for(ctx.stopped(), 1.0)
    await asyncio.wait_for(ctx.killed(), 1.0)


async def test_stop_callbacks_run_once() -> None:
    ctx = Context()
    calls: list[Context] = []
    ctx.add_stop_callback(calls.append)
    ctx.stop_generating()
    ctx.stop_generating()
    ctx.kill()
    assert calls == [ctx]


async def test_callback_added_after_the_stop_runs_at_once() -> None:
    ctx = Context()
    ctx.stop_generating()
    calls: list[Context] = []
    ctx.add_stop_callback(calls.append)
    assert calls == [ctx]


async def test_kill_runs_stop_callbacks() -> None:
    ctx = Context()
    calls: list[Context] = []
    ctx.add_stop_callback(calls.append)
    ctx.kill()
    assert calls == [ctx]


async def test_removed_callback_does_not_run() -> None:
    ctx = Context()
    calls: list[Context] = []
    ctx.add_stop_callback(calls.append)
    ctx.remove_stop_callback(calls.append)
    ctx.stop_generating()
    assert calls == []


async def test_stop_from_another_thread_wakes_an_awaiting_coroutine() -> None:
    ctx = Context()
    calls: list[int] = []
    ctx.add_stop_callback(lambda _: calls.append(threading.get_ident()))
    waiter = asyncio.ensure_future(ctx.stopped())
    await yield_to_loop()
    thread = threading.Thread(target=ctx.stop_generating)
    thread.start()
    await asyncio.wait_for(waiter, 2.0)
    thread.join()
    assert ctx.is_stopped()
    # The callback ran on the loop's thread, not the caller's.
    assert calls == [threading.get_ident()]


async def test_kill_from_another_thread_wakes_killed_waiter() -> None:
    ctx = Context()
    waiter = asyncio.ensure_future(ctx.killed())
    await yield_to_loop()
    thread = threading.Thread(target=ctx.kill)
    thread.start()
    await asyncio.wait_for(waiter, 2.0)
    thread.join()
    assert ctx.is_killed() and ctx.is_stopped()


def test_context_made_outside_a_loop_binds_when_first_awaited() -> None:
    ctx = Context("early")

    async def main() -> bool:
        waiter = asyncio.ensure_future(ctx.stopped())
        await yield_to_loop()
        ctx.stop_generating()
        await asyncio.wait_for(waiter, 1.0)
        return ctx.is_stopped()

    assert asyncio.run(main())


def test_kill_after_the_loop_closed_still_records_killed() -> None:
    async def make() -> Context:
        return Context()

    ctx = asyncio.run(make())  # bound to a loop that is now closed
    t = threading.Thread(target=ctx.kill)
    t.start()
    t.join(5)
    assert ctx.is_killed() and ctx.is_stopped()


async def test_stopped_within_returns_at_the_stop_or_the_deadline() -> None:
    ctx = Context("sw")
    assert await ctx.stopped_within(0.01) is False  # nobody stopped it
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    loop.call_soon(ctx.stop_generating)
    assert await ctx.stopped_within(30) is True
    assert loop.time() - t0 < 5  # woken by the stop, not the 30 s deadline
    assert await ctx.stopped_within(0) is True  # already stopped: at once


async def test_generate_context_stopped_within_delegates() -> None:
    from dynamo_backend_common import GenerateContext

    inner = Context("g")
    ctx = GenerateContext(inner)
    assert await ctx.stopped_within(0) is False
    inner.kill()
    assert await ctx.stopped_within(30) is True
