"""runtime.tasks: the task-ownership helpers every owner of background tasks uses."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_backend_common.runtime.tasks import TaskSet, cancel_and_wait


async def test_cancel_all_cancels_and_awaits_every_running_task() -> None:
    tasks = TaskSet()
    ended: list[str] = []
    started = asyncio.Event()

    async def forever(name: str) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    a = tasks.spawn(forever("a"))
    b = tasks.spawn(forever("b"))
    await asyncio.wait_for(started.wait(), 5)
    assert len(tasks) == 2
    await tasks.cancel_all()
    assert sorted(ended) == ["a", "b"] and a.cancelled() and b.cancelled()
    assert len(tasks) == 0
    await tasks.cancel_all()  # idempotent


async def test_finished_tasks_leave_the_set_and_failures_do_not_cancel_siblings() -> None:
    tasks = TaskSet()

    async def boom() -> None:
        raise RuntimeError("x")

    sibling = tasks.spawn(asyncio.Event().wait())
    failed = tasks.spawn(boom())
    with pytest.raises(RuntimeError):
        await failed
    await asyncio.sleep(0)  # done callbacks run on the next loop step
    assert list(tasks) == [sibling] and not sibling.done()
    await tasks.cancel_all()
    assert sibling.cancelled()


async def test_cancel_and_wait_drops_results_and_leaves_done_tasks_alone() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    done.set_result(1)
    failed = loop.create_future()
    failed.set_exception(RuntimeError("seen by nobody"))
    hung = asyncio.ensure_future(asyncio.Event().wait())
    await cancel_and_wait([done, failed, hung])
    assert hung.cancelled() and done.result() == 1 and not failed.cancelled()
    await cancel_and_wait([])
