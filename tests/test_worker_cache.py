"""The worker's model cache (scoring/worker.py ``_scorer``): one load per model however many threads ask."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from image_transfer.scoring import worker

# The outcome does not depend on library versions: CI runs this file in the default environment only.
pytestmark = pytest.mark.anyversion


@pytest.fixture
def counted_loads(monkeypatch):
    """``_load_scorer`` replaced by a loader that records each load; the cache emptied for the test."""
    monkeypatch.setattr(worker, "_CACHE", type(worker._CACHE)())
    loads: list[str] = []
    started = {key: threading.Event() for key in ("a", "b")}
    lock = threading.Lock()

    def load(prepared, shipped):
        name = prepared.cache_key[0]
        with lock:
            loads.append(name)
        started[name].set()
        prepared.wait_for()  # a slow load: other threads arrive meanwhile
        return SimpleNamespace(model=name)

    monkeypatch.setattr(worker, "_load_scorer", load)
    return loads, started


def _run_all(targets) -> list[object]:
    results: list[object] = [None] * len(targets)
    barrier = threading.Barrier(len(targets))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = targets[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_threads_asking_for_one_model_share_one_load(counted_loads):
    loads, started = counted_loads
    arrived = threading.Semaphore(0)
    prepared = SimpleNamespace(cache_key=("a",), wait_for=lambda: [arrived.acquire(timeout=2) for _ in range(7)])

    def ask():
        arrived.release()
        return worker._scorer(prepared, None)

    scorers = _run_all([ask] * 8)
    assert loads == ["a"]
    assert all(s is scorers[0] for s in scorers) and scorers[0].model == "a"


def test_different_models_load_side_by_side(counted_loads):
    """A load of model a does not hold up a load of model b: a's loader waits for b's to start."""
    loads, started = counted_loads
    met: dict[str, bool] = {}
    a = SimpleNamespace(cache_key=("a",), wait_for=lambda: met.setdefault("a", started["b"].wait(timeout=10)))
    b = SimpleNamespace(cache_key=("b",), wait_for=lambda: met.setdefault("b", started["a"].wait(timeout=10)))
    got = _run_all([lambda: worker._scorer(a, None), lambda: worker._scorer(b, None)])
    assert sorted(loads) == ["a", "b"] and [s.model for s in got] == ["a", "b"]
    assert met == {"a": True, "b": True}  # each load saw the other one start while it was loading
