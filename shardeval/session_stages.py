"""The batch stages of one attempt of a run: what to run, in which order, and when it failed.

Generations first; then each ``llm_judge`` metric (its requests are built from the
responses); then, if collecting the committed batches for finalizing finds one damaged (set
aside to quarantine/), one repair stage that recomputes it. :class:`RunSession` exposes these
as ``session.stages()``, ``session.judge_stages()`` and ``session.require(...)``; the state
they share (the survey, the judgements, the collected tables) lives on the session.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardeval.batch_requests import PlanRequests, batch_shared, duplicate_keys
from shardeval.engines import stop_error
from shardeval.errors import RunIncomplete
from shardeval.judging import judge_metrics, load_judgements, plan_judgements, tidy_judges
from shardeval.runner import BatchWork, RunRef
from shardeval.survey import Survey, survey

if TYPE_CHECKING:
    from shardeval.session import RunSession


@dataclass
class Stage:
    """Batches to run before the next step can start (generations, or one judge metric)."""

    phase: str
    """What the progress display says: ``generating``, ``judging (quality)``, ``repairing``."""
    run: RunRef
    works: Iterable[tuple[BatchWork, bool]]
    """``(work, stale)``: a stale batch's Prefect cache record must not be trusted."""
    n_requests: int = 0
    n_batches: int = 0


def stages(session: RunSession) -> Iterator[Stage]:
    """The batch stages of this attempt, in order; each must finish before the next."""
    found = session.require_survey()
    plan = session.plan
    yield Stage(
        phase="generating",
        run=session.run_ref(),
        works=batch_works(session, found, range(len(plan.batches))),
        n_requests=plan.n_rows,
        n_batches=len(plan.batches),
    )
    yield from judge_stages(session)
    damaged = collect(session)
    if damaged:
        found = survey(session.store, plan, retry_failed=False)
        session._found = found
        yield Stage(
            phase="repairing",
            run=session.run_ref(),
            works=batch_works(session, found, damaged, stale=True),
            n_requests=sum(plan.batches[i].stop - plan.batches[i].start for i in damaged),
            n_batches=len(damaged),
        )
        if collect(session):
            raise RunIncomplete(
                "committed batches were damaged again while being recomputed",
                hint="check the output storage; what is committed is kept",
            )


def judge_stages(session: RunSession) -> Iterator[Stage]:
    """One stage per ``llm_judge`` metric: its judgements, built from the ok responses."""
    for metric in judge_metrics(session.metrics):
        judged = plan_judgements(session.store, session.plan, metric, session.run_id)
        progress = session.progress
        progress.plan(
            progress.total + judged.n_requests, progress.batches_total + len(judged.works), 0
        )
        yield Stage(
            phase=f"judging ({metric.name})",
            run=judged.run,
            works=judged.works,
            n_requests=judged.n_requests,
            n_batches=len(judged.works),
        )
        session._judgements[metric.name] = load_judgements(session.store, metric)
        tidy_judges(session.store, metric)


def require(session: RunSession, stage: Stage, failures: list[str]) -> None:
    """Raise :class:`RunIncomplete` if a stage's batches failed (the rest are kept).

    If the run stopped sending (its endpoint went away, or rejected the key), that error is
    raised instead: it says what to fix, the batch failures only follow from it.
    """
    if not failures:
        return
    stopped = stop_error(session.run_id)
    if stopped is not None:
        raise stopped
    shown = "; ".join(failures[:5]) + ("; ..." if len(failures) > 5 else "")
    raise RunIncomplete(
        f"{len(failures)} of {stage.n_batches} batches could not finish ({stage.phase}): " + shown,
        hint="run the same command again to retry only what is missing",
    )


def batch_works(
    session: RunSession, found: Survey, indices: Iterable[int], *, stale: bool = False
) -> Iterator[tuple[BatchWork, bool]]:
    """Each batch's work (rendered only when submitted) and whether its record is stale."""
    plan, spec = session.plan, session.spec
    duplicates = duplicate_keys(plan)
    for index in indices:
        batch = plan.batches[index]
        work = BatchWork(
            run_id=session.run_id,
            number=batch.number,
            total=batch.total,
            key=batch.key,
            requests=PlanRequests(plan, batch),
            reuse=found.reuse.get(batch.key, {}),
            retry_failed=session.retry_failed,
            nothing_stored=batch.key not in found.committed and batch.key not in found.with_parts,
            flush_every_s=spec.flush_every_s,
            flush_every_items=spec.flush_every_items,
            shared=batch_shared(plan, batch, duplicates),
        )
        is_stale = stale or batch.key not in found.committed or batch.key in found.error_batches
        yield work, is_stale


def collect(session: RunSession) -> list[int]:
    """Read every committed batch for finalizing; the indices of those that are damaged.

    A batch that came back Cached from Prefect was never read by its task; an unreadable
    file is set aside by the store (quarantine/) and its batch recomputed.
    """
    store = session.store
    paths = [store.batch_path(b.key) for b in session.plan.batches]
    tables = list(store.read_tables(paths))
    damaged = [i for i, table in enumerate(tables) if table is None]
    session._stored = None if damaged else [t for t in tables if t is not None]
    return damaged
