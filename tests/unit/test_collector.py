"""The garbage collector is relaxed while engines are open, and restored after the last."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from shardeval import collector
from shardeval.engines import close_engines, engine_for
from shardeval.spec import ModelSpec


@pytest.fixture(autouse=True)
def _default_collector() -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    close_engines()
    gc.set_threshold(*saved)
    gc.unfreeze()


def test_engines_hold_the_relaxed_collector_until_the_last_one_closes() -> None:
    model = ModelSpec(model="m", base_url="http://127.0.0.1:9/v1")
    engine_for("run-a", model)
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() > 0  # what existed when the first engine opened
    engine_for("run-b", model)
    engine_for("run-a", model)  # the same engine again: no second hold
    close_engines("run-a")
    assert gc.get_threshold()[0] == collector.YOUNG_THRESHOLD  # run-b's engine is open
    close_engines("run-b")
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


def test_a_collector_the_user_turned_off_stays_off() -> None:
    gc.set_threshold(0)
    collector.hold()
    assert gc.get_threshold()[0] == 0
    assert gc.get_freeze_count() == 0
    collector.release()
    assert gc.get_threshold()[0] == 0


def test_a_higher_threshold_the_user_set_is_kept() -> None:
    gc.set_threshold(200_000, 10, 10)
    collector.hold()
    assert gc.get_threshold()[0] == 200_000
    collector.release()
    assert gc.get_threshold() == (200_000, 10, 10)
