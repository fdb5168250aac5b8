"""The dynamic batcher's prepare stage: requests waiting are prepared together, each keeps its own
answer or error, and an abandoned one is never prepared if it still waits, or holds its place until
a prepare under way ends."""

from __future__ import annotations

import asyncio
import csv
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from huse.runtime.serve.batcher import Batcher, Instances


class Stages:
    """Doubles each payload; a payload of None fails on its own. The first prepare call waits for `gate`,
    so that the requests sent meanwhile queue up behind it."""

    def __init__(self):
        self.calls: list[list] = []
        self.ran: list[list] = []
        self.gate = threading.Event()

    def prepare_many(self, payloads):
        self.calls.append(list(payloads))
        if len(self.calls) == 1:
            self.gate.wait(10)
        return [ValueError(f"bad payload {p}") if p is None else 2 * p for p in payloads]

    def run(self, engine, parts):
        self.ran.append(list(parts))
        return parts

    def finish(self, parts, out):
        return [p + 1 for p in out]


def _batcher(stages: Stages, pool: ThreadPoolExecutor, max_batch: int = 64) -> Batcher:
    return Batcher(stages, Instances([object()]), pool, max_batch=max_batch, max_delay=0.001)


async def _behind_a_held_call(b: Batcher, later: list[tuple]) -> tuple[asyncio.Future, list[asyncio.Future]]:
    """Submits payload 0, which holds the one prepare thread (Stages.gate), then `later` ((payload, n) each)."""
    b.start()
    first = asyncio.ensure_future(b.submit(0, 1))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(b.submit(p, n)) for p, n in later]
    await asyncio.sleep(0.05)
    return first, rest


def test_requests_waiting_are_prepared_together_and_answered_each():
    async def main():
        stages, pool = Stages(), ThreadPoolExecutor(1)
        b = _batcher(stages, pool)
        first, rest = await _behind_a_held_call(b, [(p, 1) for p in (1, None, 3, 4)])
        stages.gate.set()
        got = await asyncio.gather(first, *rest, return_exceptions=True)
        await b.stop()
        pool.shutdown()
        return stages, got, b.admitted

    stages, got, admitted = asyncio.run(main())
    assert stages.calls == [[0], [1, None, 3, 4]], "the requests that waited meanwhile take one prepare call"
    assert got[0] == 1 and got[1] == 3 and got[3] == 7 and got[4] == 9
    assert isinstance(got[2], ValueError) and "bad payload None" in str(got[2]), "one request's error is its own"
    assert admitted == 0


def test_a_prepare_call_takes_at_most_max_batch_items():
    async def main():
        stages, pool = Stages(), ThreadPoolExecutor(1)
        b = _batcher(stages, pool, max_batch=4)
        first, rest = await _behind_a_held_call(b, [(1, 3), (2, 2), (3, 1)])
        stages.gate.set()
        got = await asyncio.gather(first, *rest)
        await b.stop()
        pool.shutdown()
        return stages, got

    stages, got = asyncio.run(main())
    assert stages.calls == [[0], [1], [2, 3]], "3 items, then 2 + 1: never more than max_batch in one call"
    assert got == [1, 3, 5, 7]


def test_an_abandoned_request_holds_its_place_until_prepared_and_never_runs():
    """Abandoned while its prepare runs: a thread cannot be stopped, so its items count until it ends."""
    async def main():
        stages, pool = Stages(), ThreadPoolExecutor(1)
        b = _batcher(stages, pool)
        b.start()
        gone = asyncio.ensure_future(b.submit(5, 2))  # takes the one prepare thread and holds it (Stages.gate)
        await asyncio.sleep(0.05)
        gone.cancel()  # its client went away while its photos were being decoded
        await asyncio.sleep(0.01)
        held = b.admitted
        stages.gate.set()
        await asyncio.sleep(0.1)
        after = await b.submit(1, 1)
        await b.stop()
        pool.shutdown()
        return stages, held, b.admitted, after

    stages, held, admitted, after = asyncio.run(main())
    assert held == 2, "the abandoned request's 2 items still count while they are being prepared"
    assert admitted == 0, "and are released once their prepare ends"
    assert after == 3 and [p for batch in stages.ran for p in batch] == [2], "an abandoned request never reaches the model"


def test_a_request_abandoned_before_its_prepare_is_never_prepared():
    """Abandoned while it waits for a prepare thread (deadline, disconnect): never decoded, its items
    released at once, and the requests around it answered."""
    async def main():
        stages, pool = Stages(), ThreadPoolExecutor(1)
        b = _batcher(stages, pool)
        first, (gone, kept) = await _behind_a_held_call(b, [(5, 2), (6, 1)])
        before = b.admitted
        gone.cancel()
        await asyncio.sleep(0.01)
        released = b.admitted
        stages.gate.set()
        got = await asyncio.gather(first, kept)
        await b.stop()
        pool.shutdown()
        return stages, before, released, got, b.admitted

    stages, before, released, got, admitted = asyncio.run(main())
    assert (before, released) == (4, 2), "its 2 items are released as soon as its caller stops waiting"
    assert stages.calls == [[0], [6]], "it is never prepared"
    assert got == [1, 13] and admitted == 0


def test_a_lone_clients_third_request_runs_on_the_calling_thread():
    """run_now: declined (and not counted) until the request is the third in a row to find nothing
    else admitted; then prepared, run and finished on the caller's thread, its errors raised there;
    declined whenever anything is admitted."""
    async def main():
        stages, pool = Stages(), ThreadPoolExecutor(1)
        stages.gate.set()
        b = _batcher(stages, pool)
        b.start()
        first = [b.run_now(1, 1)]
        for p in (1, 2):  # two lone requests through the batcher: the idle streak is 2
            assert await b.submit(p, 1) == 2 * p + 1
        threads = []
        stages.run = lambda engine, parts: threads.append(threading.current_thread()) or parts
        now = b.run_now(3, 1)
        with pytest.raises(ValueError, match="bad payload None"):
            b.run_now(None, 1)
        held = asyncio.ensure_future(b.submit(4, 1))  # admitted while its batch runs
        await asyncio.sleep(0)
        busy = b.run_now(5, 1)
        await held
        await b.stop()
        pool.shutdown()
        return first, now, threads, busy, b.admitted

    first, now, threads, busy, admitted = asyncio.run(main())
    assert first == [(False, None)], "the first arrival is not a lone client's yet"
    assert now == (True, 7) and threads[0] is threading.main_thread(), "no hand-off to the instance's thread"
    assert busy == (False, None), "with a request admitted it is declined"
    assert admitted == 0


def test_image_batch_split_undoes_concat():
    from huse.runtime.preprocess import ImageBatch

    rng = np.random.default_rng(0)
    parts = [ImageBatch(3, rng.standard_normal((2, 3, 4, 4)).astype(np.float32), {0: 0, 2: 1}, {1: "bad"}, {2: "warn"}),
             ImageBatch(1, np.zeros((0, 3, 4, 4), np.float32), {}, {}, {}),
             ImageBatch(2, rng.standard_normal((2, 3, 4, 4)).astype(np.float32), {0: 0, 1: 1}, {}, {0: "w0"})]
    back = ImageBatch.concat(parts).split([3, 1, 2])
    for a, b in zip(parts, back):
        assert (a.n, a.rows, a.errors, a.warnings) == (b.n, b.rows, b.errors, b.warnings)
        np.testing.assert_array_equal(a.array, b.array)
    with pytest.raises(ValueError, match="add up to 5"):
        ImageBatch.concat(parts).split([3, 2])


def test_prepare_many_equals_preparing_each_request_alone(tiny_bundle, tiny_catalog):
    from huse.runtime.classifier import Classifier
    from huse.runtime.serve.models import ClassifyModel, EmbedModel
    from huse.runtime.serve.protocol import Items

    rows = list(csv.DictReader(open(tiny_catalog, newline="")))[:5]
    photos = [(tiny_catalog.parent / r["image"]).read_bytes() for r in rows]
    titles = [r["name"].encode() for r in rows]
    requests = [Items(photos[:2], titles[:2], {"top_k": 2}),
                Items([b"\x89PNG\r\n\x1a\n truncated", photos[2]], [titles[2], None], {}),
                Items(None, titles[3:], {"mode": "text"}),
                Items(photos[3:], titles[3:], {"top_k": 0}),  # refused alone
                Items(photos[4:], None, {"mode": "image"})]
    clf = Classifier(tiny_bundle)
    for model in (ClassifyModel(clf), EmbedModel(clf)):
        together = model.prepare_many(requests)
        for items, got in zip(requests, together):
            alone = model.prepare_many([items])[0]
            if isinstance(alone, Exception):
                assert type(got) is type(alone) and str(got) == str(alone)
                continue
            if isinstance(model, ClassifyModel):
                (p, k), (q, k2) = alone, got
                assert k == k2 and p.results == q.results and p.warnings == q.warnings
                assert p.groups.keys() == q.groups.keys()
                for g in p.groups:
                    assert p.groups[g][0] == q.groups[g][0]
                    for name in p.groups[g][1]:
                        np.testing.assert_array_equal(p.groups[g][1][name], q.groups[g][1][name])
            else:
                assert (alone.titles, alone.errors, alone.space) == (got.titles, got.errors, got.space)
                assert (alone.decoded.rows, alone.decoded.errors) == (got.decoded.rows, got.decoded.errors)
                np.testing.assert_array_equal(alone.decoded.array, got.decoded.array)
    assert isinstance(ClassifyModel(clf).prepare_many(requests)[3], Exception)


def test_a_model_whose_requests_keep_coming_does_not_starve_the_other():
    # Two served models share the prepare pool (one thread here). Model A's requests arrive faster
    # than its prepare calls end, so its queue never empties; model B's one request must still get
    # a turn, not wait until A's clients stop.
    class Slow(Stages):
        def prepare_many(self, payloads):
            time.sleep(0.01)
            return super().prepare_many(payloads)

    async def main():
        pool = ThreadPoolExecutor(1)
        a_stages, b_stages = Slow(), Stages()
        a_stages.gate.set()
        b_stages.calls.append(["warm"])  # B's first call must not wait for its gate
        a, b = _batcher(a_stages, pool), _batcher(b_stages, pool)
        a.start()
        b.start()
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + 1.0
        sent = []

        async def keep_sending():
            while loop.time() < stop_at:
                sent.append(asyncio.ensure_future(a.submit(1, 1)))
                await asyncio.sleep(0.002)

        feeder = asyncio.ensure_future(keep_sending())
        await asyncio.sleep(0.1)
        t0 = loop.time()
        assert await b.submit(5, 1) == 11
        waited = loop.time() - t0
        still_sending = loop.time() < stop_at
        await feeder
        await asyncio.gather(*sent)
        await a.stop()
        await b.stop()
        pool.shutdown()
        return waited, still_sending

    waited, still_sending = asyncio.run(main())
    assert still_sending and waited < 0.5, f"B's request waited {waited:.2f} s behind A's"
