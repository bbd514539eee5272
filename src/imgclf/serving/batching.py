"""Stack concurrent requests into one forward pass.

A CNN's forward pass on 32 images costs far less than 32 passes on one (the convolutions
vectorise across the batch, on a CPU as on a GPU), so under load the server answers more
images per second by waiting a little for company. The batcher keeps a queue: the first
request of a batch waits at most ``max_wait_s`` for others, a batch never exceeds
``max_batch`` images, and requests that arrive while a batch runs form the next one, so
under load no one waits for the timer at all. The forward pass runs on one worker thread,
which keeps the event loop free to accept and decode the next requests meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass
class _Pending:
    inputs: Any
    size: int
    future: asyncio.Future[torch.Tensor]


class MicroBatcher:
    """Run ``forward`` on batches gathered from concurrent :meth:`submit` calls.

    ``forward`` gets the submitted inputs of one batch as a list and returns one output row
    per image, in order: turning the inputs into a tensor happens there, on the forward
    thread, so that every parallel torch op of the server runs on that one thread.
    ``on_batch(images, seconds)`` is called after each forward pass (metrics).
    """

    def __init__(
        self,
        forward: Callable[[list[Any]], torch.Tensor],
        *,
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="imgclf-forward"
        )

    def run_on_worker(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the forward thread and return its result (blocking).

        Load the model and warm it up here: PyTorch's CPU thread pool (OpenMP) belongs to
        the thread that first runs a parallel op, so a model loaded on the main thread and
        run on the worker would keep two pools spinning against each other on the same
        cores (measured: a single-image forward 50% slower, a batch of 32 70% slower).
        """
        return self._executor.submit(fn).result()

    async def submit(self, inputs: Any, size: int) -> torch.Tensor:
        """The forward pass's ``size`` output rows for ``inputs``, batched with others."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run())
        assert self._queue is not None
        pending = _Pending(inputs, size, loop.create_future())
        await self._queue.put(pending)
        return await pending.future

    async def _gather(self, first: _Pending) -> list[_Pending]:
        assert self._queue is not None
        batch, size = [first], first.size
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + item.size > self.max_batch:
                # Keep it for the next batch instead of exceeding the bound.
                self._queue.put_nowait(item)
                break
            batch.append(item)
            size += item.size
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = await self._gather(first)
            live = [p for p in batch if not p.future.done()]  # a client may have gone
            if not live:
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self.forward, [p.inputs for p in live]
                )
            except Exception as exc:  # the error belongs to each request of the batch
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(outputs), time.perf_counter() - started)
            offset = 0
            for p in live:
                n = p.size
                if not p.future.done():
                    p.future.set_result(outputs[offset : offset + n])
                offset += n

    def close(self) -> None:
        """Stop the worker task and thread (the server is shutting down)."""
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
