"""The dynamic batcher: requests from concurrent clients merged into batches, as Triton's does.

It knows nothing about HTTP. A request's items are prepared (decoded, tokenised) in a thread
pool, then queued: a prepare thread takes every request waiting and prepares them together, so
under load one hand-off and one batched decode serve many requests. A dispatcher takes the oldest
queued request, waits for a free model instance, adds the requests queued behind it up to
`max_batch` items (waiting at most `max_delay` after the oldest arrived for more to come, but only
while other requests are still being prepared: a request alone runs at once), and runs the batch
and its finish on that instance's own thread while it forms the next one: one hand-off per batch,
since each thread hand-off costs a wake-up and a GIL switch, the bulk of a single-item request's
overhead. A request of a lone client (it and the two before it found nothing else admitted) skips
the pool and the queue: prepare, run and finish in one hand-off to that instance. The event loop
never decodes or runs a model.

Admission is bounded: a request whose items would take the queue past `max_queue`, or whose
expected wait (the items admitted ahead of it times the recent seconds per answered item while
busy: decoding, model, hand-offs, all of it) is past `max_wait`, is refused at once
(`Overloaded`), never buffered. A caller that stops waiting (its deadline passed, its
client disconnected: the awaiting task is cancelled) has its items dropped: never decoded while they
still wait for a prepare thread, never run once queued.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence


class Overloaded(Exception):
    """The queue is full; the caller should answer 503 with Retry-After."""


class Admission:
    """How many items are admitted and not yet answered, how fast they drain, and whether n more
    may come in: the rule both the batcher and `huse serve`'s HTTP front (which admits for the
    batcher in its model process, huse.runtime.serve.worker) apply.

    Args:
        max_queue: most items admitted at once.
        max_wait: refuse a request whose expected wait is longer than this many seconds (None: no such limit).
    """

    def __init__(self, max_queue: int = 1024, max_wait: float | None = None):
        self.max_queue, self.max_wait = max_queue, max_wait
        self.admitted = 0
        # Seconds per answered item while busy (a moving average of the time between answers): how
        # fast the items admitted ahead of a new request will drain. It counts every stage and any
        # contention for the cores, so under overload it grows and admission tightens.
        self.item_seconds = 0.0
        self._busy_since = self._last_done = 0.0

    def check(self, n: int) -> None:
        """Raises Overloaded when admitting n more items would take the queue past max_queue, or
        when they would wait longer than max_wait (an empty queue takes a request of any size)."""
        if self.admitted == 0:
            return
        if self.admitted + n > self.max_queue:
            raise Overloaded(f"{self.admitted} items are queued (--max-queue {self.max_queue})")
        if self.max_wait is not None:
            wait = (self.admitted + n) * self.item_seconds
            if wait > self.max_wait:
                raise Overloaded(f"the {self.admitted} items queued would take ~{wait:.2f} s, more than the "
                                 f"{self.max_wait:g} s this request may wait")

    def admit(self, n: int) -> None:
        if self.admitted == 0:
            self._busy_since = time.monotonic()
        self.admitted += n

    def release(self, n: int) -> None:
        """n items left (answered, failed or dropped)."""
        self.admitted -= n

    def answered(self, n: int) -> None:
        """n items were answered: update the seconds per item while busy."""
        now = time.monotonic()
        per_item = (now - max(self._last_done, self._busy_since)) / max(1, n)
        self._last_done = now
        self.item_seconds = per_item if not self.item_seconds else 0.8 * self.item_seconds + 0.2 * per_item


class Stages(Protocol):
    """What a served model gives the batcher (huse.runtime.serve.models)."""

    def prepare_many(self, payloads: Sequence[Any]) -> list[Any]: ...
    def run(self, instance: Any, parts: Sequence[Any]) -> Any: ...
    def finish(self, parts: Sequence[Any], out: Any) -> list[Any]: ...


class Instances:
    """Model instances (e.g. one Classifier each), each with its own thread; the batchers of
    every served model share them, so `--instances N` bounds how many batches run at once.

    Args:
        engines: one object per instance, handed to `Stages.run`.
        initializer: run first on each instance's thread (e.g. to lower its priority).
    """

    def __init__(self, engines: Sequence[Any], initializer: Callable[[], None] | None = None):
        self.engines = list(engines)
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"huse-instance-{i}", initializer=initializer)
                         for i in range(len(engines))]
        self._free: asyncio.Queue | None = None

    def _queue(self) -> asyncio.Queue:
        if self._free is None:
            self._free = asyncio.Queue()
            for i in range(len(self.engines)):
                self._free.put_nowait(i)
        return self._free

    async def acquire(self) -> int:
        return await self._queue().get()

    def try_acquire(self) -> int | None:
        """A free instance now, or None."""
        try:
            return self._queue().get_nowait()
        except asyncio.QueueEmpty:
            return None

    def release(self, i: int) -> None:
        self._free.put_nowait(i)

    def start(self, i: int, fn: Callable, *args) -> asyncio.Future:
        """fn(engine i, *args) on instance i's thread; the future of its result."""
        return asyncio.get_running_loop().run_in_executor(self._threads[i], fn, self.engines[i], *args)

    async def call(self, i: int, fn: Callable, *args) -> Any:
        """fn(engine i, *args) on instance i's thread."""
        return await self.start(i, fn, *args)

    def close(self) -> None:
        for t in self._threads:
            t.shutdown(wait=True)


@dataclass
class _Raw:
    """A request waiting to be prepared."""

    payload: Any
    n: int
    future: asyncio.Future  # its result
    prepared: bool = False
    abandoned: bool = False  # its caller stopped waiting before it was prepared


@dataclass
class _Entry:
    part: Any
    n: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Dynamic batching of one served model.

    Args:
        stages: the model's prepare / run / finish.
        instances: the model instances (shared by the batchers of all served models).
        pool: threads for prepare.
        max_batch: most items per batch (a larger request runs as its own batch).
        max_delay: seconds a batch may wait after its oldest request arrived for more to join.
        max_queue: most items admitted (being prepared or queued) at once.
        max_wait: refuse a request whose expected wait for the model is longer than this many
            seconds (None: no such limit).
        on_batch: called with each batch's item count (metrics).
    """

    def __init__(self, stages: Stages, instances: Instances, pool: ThreadPoolExecutor, max_batch: int = 64,
                 max_delay: float = 0.003, max_queue: int = 1024, max_wait: float | None = None,
                 on_batch: Callable[[int], None] | None = None):
        self.stages, self.instances, self.pool = stages, instances, pool
        self.max_batch, self.max_delay = max_batch, max_delay
        # items being prepared, queued or run (abandoned ones until a prepare already under way ends)
        self.admission = Admission(max_queue, max_wait)
        self.on_batch = on_batch or (lambda n: None)
        self.preparing = 0  # items being prepared: what a forming batch may still wait for
        self._idle_streak = 0  # requests in a row that found nothing else admitted
        self._queue: collections.deque[_Entry] = collections.deque()
        self._raw: collections.deque[_Raw] = collections.deque()  # waiting for a prepare thread
        self._raw_lock = threading.Lock()  # guards _raw and _preparers (the event loop and the prepare threads)
        self._preparers = 0  # prepare turns running or queued (_prepare_loop)
        self._max_preparers = pool._max_workers
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    @property
    def queued(self) -> int:
        """Items waiting for a model instance."""
        return sum(e.n for e in self._queue)

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        """Finish the batches running, then stop (queued requests were drained by the server before)."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, payload: Any, n: int) -> Any:
        """Prepare `payload` (n items), queue it, and return its result when its batch is done.

        Raises:
            Overloaded: admitting n more items would exceed max_queue.
            Whatever prepare, run or finish raised (e.g. a HuseError for the request as a whole).
        """
        self.check(n)
        # A client alone: this request and the two before it found nothing else admitted. One idle
        # moment is not enough: closed-loop clients answered by one batch come back together, and
        # the first of them taking the short path would split their next batch in two.
        self._idle_streak = self._idle_streak + 1 if self.admitted == 0 else 0
        if self._idle_streak >= 3:
            instance = self.instances.try_acquire()
            if instance is not None:
                return await self._run_alone(instance, payload, n)
        self.admission.admit(n)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        raw = _Raw(payload, n, future)
        self.preparing += n
        with self._raw_lock:
            self._raw.append(raw)
            start = self._preparers < self._max_preparers
            self._preparers += start
        if start:
            self.pool.submit(self._prepare_loop, loop)
        try:
            return await future
        finally:
            future.cancel()  # a caller that stopped waiting: the dispatcher skips its entry
            if raw.prepared:
                self.admission.release(n)
            else:
                self._abandon(raw)

    def _abandon(self, raw: "_Raw") -> None:
        """A caller stopped waiting before its request was prepared. Still waiting for a prepare thread, it is
        taken out (nothing decoded) and its items released; being prepared (a thread cannot be stopped), its
        items hold their place until that prepare ends and are then dropped."""
        with self._raw_lock:
            try:
                self._raw.remove(raw)
                waiting = True
            except ValueError:  # a prepare thread has it
                waiting = False
            raw.abandoned = True
        if waiting:
            self.preparing -= raw.n
            self.admission.release(raw.n)
            self._arrived.set()  # a forming batch need not wait for these items

    def _prepare_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """One turn of a prepare thread: takes every request waiting (up to max_batch items) and
        prepares them together; under load that is one hand-off and one batched decode for many
        requests, not one each. While requests still wait, its next turn queues behind whatever else
        the pool has to do (the other served model's turns), so that no model's requests wait
        while another model's keep coming."""
        with self._raw_lock:
            taken, n = [], 0
            while self._raw and (not taken or n + self._raw[0].n <= self.max_batch):
                taken.append(self._raw.popleft())
                n += taken[-1].n
            if not taken:
                self._preparers -= 1
                return
        try:
            parts = self.stages.prepare_many([r.payload for r in taken])
        except Exception as e:  # not one request's fault: each of them gets the error
            parts = [e] * len(taken)
        try:
            loop.call_soon_threadsafe(self._prepared, taken, parts)
            self.pool.submit(self._prepare_loop, loop)
        except RuntimeError:  # the loop has closed or the pool shut down: nobody waits any more
            pass

    def _prepared(self, taken: list["_Raw"], parts: list[Any]) -> None:
        """On the event loop: prepared requests join the queue (or get their error), at once, so that a
        forming batch sees them before it decides that nothing else is on its way."""
        for raw, part in zip(taken, parts):
            raw.prepared = True
            self.preparing -= raw.n
            if raw.abandoned:
                self.admission.release(raw.n)
            elif isinstance(part, Exception):
                raw.future.set_exception(part)
            else:
                self._queue.append(_Entry(part, raw.n, raw.future))
        self._arrived.set()

    async def _run_alone(self, instance: int, payload: Any, n: int) -> Any:
        """A request with nothing else admitted and a free instance (e.g. a lone client): prepare,
        run and finish in one hand-off to the instance's thread, not three, since at low load the
        hand-offs are most of the time a request spends outside the model. A caller that stops
        waiting while its items are prepared has them dropped before the model, as from the queue."""
        self.admission.admit(n)
        abandoned = threading.Event()
        work = self.instances.start(instance, self._whole, payload, n, abandoned)

        def done(f: asyncio.Future) -> None:
            self.admission.release(n)
            self.instances.release(instance)
            if not f.cancelled() and f.exception() is None:  # seen, also when nobody waits any more
                self.admission.answered(n)
        work.add_done_callback(done)
        try:
            return await asyncio.shield(work)
        finally:
            abandoned.set()

    def run_now(self, payload: Any, n: int) -> tuple[bool, Any]:
        """A lone client's request (it and the two before it found nothing else admitted, as in `submit`)
        prepared, run and finished on the calling thread, the event loop's, when an instance is free:
        (True, its result). Otherwise (False, None), and the arrival is not counted: the caller submits it.

        Meant for a caller with nothing else waiting to be read (the model process's reader): the event
        loop is held for the request's decode and inference, and in exchange the request skips the two
        thread hand-offs of `_run_alone` (on a 2-core VM ~0.1 ms each way at concurrency 1, timed).
        Run for every arrival regardless, requests read together would run one by one, each finding
        the last one done and nothing admitted.

        Raises:
            Whatever prepare, run or finish raised.
        """
        if self.admitted or self._idle_streak < 2:
            return False, None
        instance = self.instances.try_acquire()
        if instance is None:
            return False, None
        self._idle_streak += 1
        self.admission.admit(n)
        try:
            result = self._whole(self.instances.engines[instance], payload, n)
            self.admission.answered(n)
            return True, result
        finally:
            self.admission.release(n)
            self.instances.release(instance)

    def _whole(self, engine: Any, payload: Any, n: int, abandoned: threading.Event | None = None) -> Any:
        part = self.stages.prepare_many([payload])[0]
        if isinstance(part, Exception):
            raise part
        parts = [part]
        if abandoned is not None and abandoned.is_set():
            return None
        self.on_batch(n)
        return self._run_and_finish(engine, parts)[0]

    @property
    def admitted(self) -> int:
        return self.admission.admitted

    def check(self, n: int) -> None:
        """Raises Overloaded when n more items may not be admitted (`Admission.check`)."""
        self.admission.check(n)

    def _pop_live(self) -> _Entry | None:
        while self._queue:
            e = self._queue.popleft()
            if not e.future.done():
                return e
        return None

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = self._pop_live()
            if first is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            instance = await self.instances.acquire()
            batch, n = [first], first.n
            close_at = first.arrived + self.max_delay
            while n < self.max_batch:
                while self._queue and self._queue[0].future.done():
                    self._queue.popleft()
                if self._queue:
                    if n + self._queue[0].n > self.max_batch:
                        break  # the next request starts the next batch
                    e = self._queue.popleft()
                    batch.append(e)
                    n += e.n
                    continue
                wait = close_at - time.monotonic()
                if wait <= 0 or not self.preparing:
                    break  # nothing else is on its way (e.g. one client alone): waiting would only add latency
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    break
            batch = [e for e in batch if not e.future.done()]
            if not batch:
                self.instances.release(instance)
                continue
            task = loop.create_task(self._run(instance, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, instance: int, batch: list[_Entry]) -> None:
        parts = [e.part for e in batch]
        n = sum(e.n for e in batch)
        self.on_batch(n)
        try:
            try:
                results = await self.instances.call(instance, self._run_and_finish, parts)
                self.admission.answered(n)
            finally:
                self.instances.release(instance)
        except Exception as exc:  # the whole batch failed: each of its requests gets the error
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        for e, r in zip(batch, results):
            if not e.future.done():
                e.future.set_result(r)

    def _run_and_finish(self, engine: Any, parts: list[Any]) -> list[Any]:
        return self.stages.finish(parts, self.stages.run(engine, parts))
