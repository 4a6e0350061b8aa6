"""The engines of this process: one per run and model, shared by every batch of the run.

Kept apart from :mod:`shardeval.engine` (how one engine sends requests): this is which engine
a batch gets, and how a run's engines are asked why they stopped and closed at its end.
"""

from __future__ import annotations

import atexit
import threading

from shardeval import collector, interrupt
from shardeval.engine import Engine
from shardeval.errors import ShardevalError
from shardeval.spec import ModelSpec

_engines: dict[tuple[str, str], Engine] = {}
_engines_lock = threading.Lock()


def engine_for(run_id: str, model: ModelSpec) -> Engine:
    """The engine of a run in this process, created on first use.

    Keyed by run id and the model's whole spec (including endpoint and concurrency), so every
    batch of a run shares one limit, and a Dask worker process builds its own on demand.
    """
    key = (run_id, model.model_dump_json())
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            judge = run_id.split("/judges/", 1)[1] if "/judges/" in run_id else None
            field = "model" if judge is None else f"metric {judge!r}: model"
            engine = _engines[key] = Engine(model, field=field, run_id=run_id)
            collector.hold()
    interrupt.handle_signals_in_dask_worker()
    return engine


def run_stopped(run_id: str | None = None) -> bool:
    """Whether an engine of ``run_id`` (or any, with None) in this process stopped its run."""
    with _engines_lock:
        engines = [
            e
            for (r, _), e in _engines.items()
            if run_id is None or r == run_id or r.startswith(run_id + "/")
        ]
    return any(e.stop_error is not None for e in engines)


def stop_error(run_id: str) -> ShardevalError | None:
    """The error that stopped ``run_id`` (its model's or a judge's engine), if any."""
    with _engines_lock:
        engines = [e for (r, _), e in _engines.items() if r == run_id or r.startswith(run_id + "/")]
    for engine in engines:
        if engine.stop_error is not None:
            error = engine.stop_error
            return type(error)(error.message, hint=error.hint)
    return None


def close_engines(run_id: str | None = None) -> None:
    """Close the engines of one run, its judges included (or all of them)."""
    with _engines_lock:
        keys = [
            k for k in _engines if run_id is None or k[0] == run_id or k[0].startswith(run_id + "/")
        ]
        engines = [_engines.pop(k) for k in keys]
    for engine in engines:
        engine.close()
        collector.release()


atexit.register(close_engines)
