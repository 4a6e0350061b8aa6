"""A run session: the steps of one attempt of one run, each decided once, here.

The life of a run (docs/architecture.md draws it)::

    RunSession.prepare(spec, ...)      spec → validated plan → run id (+ why it is a new run)
    session.answer_from_storage()      metrics.json current for this plan and metrics? done
    with session.attempt(wait=...):    take the lease, survey what is stored, record the attempt
        for stage in session.stages(): generations, then each llm_judge metric, then a repair
            <run stage.works>          of any committed batch found damaged when collected
            session.require(stage, failures)
        session.finalize()             results.parquet, then metrics.json (written last)

The Prefect flows only compose these steps as tasks (flows/evaluate.py); the CLI and the
Python API prepare the session before Prefect starts, so bad input fails in a second.
Nothing here imports Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from shardeval import __version__, interrupt, session_stages
from shardeval.budget import close_budget, open_budget, stored_spend
from shardeval.cost import part_prices
from shardeval.engines import close_engines
from shardeval.finality import summary_has_auth_errors
from shardeval.finalize import Finalized, finalize, is_current, keep_history
from shardeval.hashing import default_run_id, model_fingerprint, run_id_inputs
from shardeval.judging import Judgements, judge_metrics, judge_run_id
from shardeval.locking import RunLock
from shardeval.metrics import Metric
from shardeval.overrides import resolve_spec
from shardeval.planning import RunPlan
from shardeval.progress import RunProgress, progress_for
from shardeval.run_id import choose_run_id
from shardeval.runcard import CardKeeper, record_complete
from shardeval.runner import RunRef
from shardeval.session_stages import Stage
from shardeval.spec import EvalSpec
from shardeval.storage import RunStore
from shardeval.survey import Survey, survey
from shardeval.validation import Validated, validate

logger = logging.getLogger("shardeval.run")
"""What a run found and does, for the person who started it; the CLI shows its INFO lines."""


@dataclass(frozen=True)
class SessionRef:
    """What a session becomes when pickled: which run it is, nothing else.

    Prefect ships a flow run's context (its parameters among them) to Dask workers; a session
    holds the plan, open judges and the run card's refresh thread, none of which a worker needs
    or could unpickle. Workers rebuild what they need from each batch's ``RunRef``.
    """

    run_id: str
    output: str


@dataclass
class AttemptStats:
    """What this attempt did (for the summary and metrics.json)."""

    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    resume_message: str = ""


class RunSession:
    """One attempt of one run (see the module docstring for the steps).

    ``__slots__`` also keeps Prefect from encoding a session handed to a flow as a parameter
    attribute by attribute (its plan holds every row's key): with no ``__dict__`` the encoder
    gives up at once and the flow run records ``<RunSession>``.
    """

    __slots__ = (
        "_card",
        "_found",
        "_judgements",
        "_stored",
        "new_run_reason",
        "retry_failed",
        "run_id",
        "stats",
        "store",
        "validated",
    )

    def __init__(
        self,
        validated: Validated,
        run_id: str,
        store: RunStore,
        *,
        retry_failed: bool = False,
        new_run_reason: str | None = None,
    ) -> None:
        self.validated = validated
        self.run_id = run_id
        self.store = store
        self.retry_failed = retry_failed
        self.new_run_reason = new_run_reason
        """Why this is a new run where a resume may have been expected (None otherwise)."""
        self.stats = AttemptStats()
        self._found: Survey | None = None
        self._judgements: dict[str, Judgements] = {}
        self._stored: list[pa.Table] | None = None
        self._card: CardKeeper | None = None

    def __reduce__(self) -> tuple[type[SessionRef], tuple[str, str]]:
        """Pickle as a :class:`SessionRef` (see there)."""
        return SessionRef, (self.run_id, self.store.output)

    # ------------------------------------------------------------------ prepare
    @classmethod
    def prepare(
        cls,
        spec: str | Mapping[str, Any] | EvalSpec,
        *,
        output: str | None = None,
        run_id: str | None = None,
        fresh: bool = False,
        retry_failed: bool = False,
        limit: int | None = None,
        batch_size: int | None = None,
        concurrency: int | None = None,
        flow_run_id: str | None = None,
        overrides: Sequence[str] = (),
    ) -> RunSession:
        """Validate the spec, build the plan and choose the run id (raises exit-2 errors).

        ``flow_run_id`` is set for a deployment run: without an explicit ``run_id`` each flow
        run is a new eval run (a nightly schedule measures tonight's model), and a retry of the
        same flow run, which keeps its id, resumes it. ``overrides`` are ``--set``/``--model``
        as ``FIELD=VALUE`` strings (:mod:`shardeval.overrides`), applied before the run id.
        """
        eval_spec = resolve_spec(
            spec, batch_size=batch_size, concurrency=concurrency, overrides=overrides
        )
        validated = validate(eval_spec, limit=limit)
        out = output or eval_spec.output
        if run_id is None and not fresh and flow_run_id:
            run_id = f"{default_run_id(eval_spec)}-{flow_run_id[:8]}"
        chosen, reason = choose_run_id(eval_spec, out, run_id, fresh=fresh)
        return cls(
            validated,
            chosen,
            RunStore(out, chosen),
            retry_failed=retry_failed,
            new_run_reason=reason,
        )

    @property
    def spec(self) -> EvalSpec:  # noqa: D102
        return self.validated.spec

    @property
    def plan(self) -> RunPlan:  # noqa: D102
        return self.validated.plan

    @property
    def metrics(self) -> list[Metric]:  # noqa: D102
        return self.validated.metrics

    @property
    def progress(self) -> RunProgress:
        """The run's progress counters (the CLI's display and the Prefect artifact read them)."""
        return progress_for(self.run_id)

    # ---------------------------------------------------------- from storage
    def answer_from_storage(self) -> dict[str, Any] | None:
        """metrics.json, when it is complete and current for this plan, metrics and prices.

        Then the run needs no Prefect and no model call at all. ``--retry-failed`` always
        runs (its point is to send the error rows again).
        """
        if self.retry_failed:
            return None
        summary = self.store.read_json(self.store.metrics_path)
        if summary_has_auth_errors(summary):
            return None  # 401/403 rows of an earlier version are sent again
        prices = part_prices(self.spec.model, self.metrics)  # a price edit re-finalizes
        plan = self.plan.fingerprint()
        if not is_current(summary, plan_fingerprint=plan, metrics=self.metrics, prices=prices):
            return None
        if not self.store.exists(self.store.results_path):
            return None
        RunLock(self.store).clear_stale()  # left by a kill between metrics.json and release
        assert isinstance(summary, dict)
        record_complete(self, summary)  # the card of a run killed before it said "complete"
        return summary

    def preflight(self) -> None:
        """Prove every endpoint the run will call answers, with this model and key (exit 2).

        Called before any batch: by the CLI and ``shardeval.run`` before Prefect starts, and by
        the flow's prepare task for a deployment run (docs/cli.md, the preflight). An endpoint
        the run has nothing to send to is left alone (a check may cost a one-token completion):
        the model when every generation is stored, a judge when its judgements are too.
        """
        from shardeval.preflight import preflight

        found = survey(self.store, self.plan, retry_failed=self.retry_failed)
        fields = set()
        if self.retry_failed or found.done_rows < self.plan.n_rows:
            fields.add("model")
        for index, metric in enumerate(self.metrics):
            if metric in judge_metrics(self.metrics):
                judged = RunStore(self.store.output, judge_run_id(self.run_id, metric))
                if "model" in fields or not judged.list_batches():
                    fields.add(f"metrics[{index}].model")
        preflight(self.spec, fields=fields)

    # ----------------------------------------------------------------- attempt
    @contextmanager
    def lease(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the run's lease (one writer per run); close the run's engines at the end."""
        lock = RunLock(self.store)
        try:
            lock.acquire(wait=wait)
            yield
        finally:
            lock.release()  # only removes the lease if it is ours
            close_engines(self.run_id)
            close_budget(self.run_id)
            interrupt.forget(self.run_id)  # the next run of this id in this process starts clean

    @contextmanager
    def attempt(self, *, wait: bool = False) -> Iterator[str]:
        """Hold the lease for one attempt; yield what was found ("resuming run ...").

        Survey first: it compares the plan with the previous attempt's plan.parquet, which
        recording the attempt then replaces.
        """
        with self.lease(wait=wait):
            self.stats = AttemptStats()
            self._found = survey(self.store, self.plan, retry_failed=self.retry_failed)
            self._record_attempt()
            if self.spec.model.max_cost_usd is not None:
                open_budget(self.run_id, self.spec.model, stored_spend(self.store, self.spec.model))
            self.progress.plan(self.plan.n_rows, len(self.plan.batches), 0)
            self.stats.resume_message = describe_resume(self.run_id, self.plan, self._found)
            logger.info(self.stats.resume_message)
            self._card = CardKeeper(self)  # run.json: running, refreshed, then how it ended
            with self._card:
                yield self.stats.resume_message

    def _record_attempt(self) -> None:
        """Write spec.json and plan.parquet for this attempt (the lease holder only)."""
        spec, store = self.spec, self.store
        store.clean_tmp()
        record = {
            "run_id": self.run_id,
            "spec": spec.public_dict(),
            "spec_source": spec.source,
            "dataset_url": self.validated.dataset.url,
            "dataset_fingerprint": self.validated.dataset.fingerprint,
            "identity": run_id_inputs(spec),
            "model_fingerprint": model_fingerprint(spec.model),
            "metric_fingerprints": {m.name: m.fingerprint() for m in self.metrics},
            "plan_fingerprint": self.plan.fingerprint(),
            "limit": self.plan.limit,
            "batch_keys": [b.key for b in self.plan.batches],
            "started_at": self.stats.started_at.isoformat(timespec="seconds"),
            "shardeval_version": __version__,
        }
        store.gather(
            self._retire_stale_metrics,
            lambda: store.write_json(store.spec_path, record),
            lambda: store.write_table(store.plan_path, self.plan.rows),
        )

    def _retire_stale_metrics(self) -> None:
        """Move a metrics.json of another plan to history/: it no longer describes this run.

        (After ``--limit 5``, a full run must not leave "complete: true" for 5 items behind if
        it fails midway.) Nothing is deleted.
        """
        previous = self.store.read_json(self.store.metrics_path)
        current = self.plan.fingerprint()
        if isinstance(previous, dict) and previous.get("plan_fingerprint") != current:
            keep_history(self.store)
            self.store.delete([self.store.metrics_path])

    # ------------------------------------------------------------------ stages
    def stages(self) -> Iterator[Stage]:
        """The batch stages of this attempt, in order (:func:`shardeval.session_stages.stages`)."""
        return session_stages.stages(self)

    def judge_stages(self) -> Iterator[Stage]:
        """One stage per ``llm_judge`` metric (:func:`shardeval.session_stages.judge_stages`)."""
        return session_stages.judge_stages(self)

    def require(self, stage: Stage, failures: list[str]) -> None:
        """Raise if a stage's batches failed (:func:`shardeval.session_stages.require`)."""
        session_stages.require(self, stage, failures)

    def run_ref(self) -> RunRef:
        """Which run batch tasks work for (small and picklable, for any process)."""
        return RunRef(run_id=self.run_id, output=self.store.output, model=self.spec.model)

    def require_survey(self) -> Survey:
        """What this attempt's survey found (stages run inside :meth:`attempt`)."""
        if self._found is None:
            raise RuntimeError("stages() runs inside session.attempt()")
        return self._found

    # ---------------------------------------------------------------- finalize
    def finalize(self, run_stats: Mapping[str, Any] | None = None) -> Finalized:
        """results.parquet, then metrics.json; judgements are an input, not metric state."""
        del run_stats  # counted by the progress; kept for callers that pass it
        done = finalize(
            self.store,
            self.plan,
            self.metrics,
            started_at=self.stats.started_at,
            finished_at=datetime.now(UTC),
            judgements=self._judgements or None,
            stored=self._stored,
        )
        (self._card or CardKeeper(self)).finish(done.metrics_json)
        return done


def describe_resume(run_id: str, plan: RunPlan, found: Survey) -> str:
    """``resuming run X: 1,234 of 2,000 items done; dataset changed ...``."""
    total = plan.n_rows
    if found.diff is None and not found.done_rows:
        return f"starting run {run_id}: {total:,} requests in {len(plan.batches)} batches"
    text = f"resuming run {run_id}: {found.done_rows:,} of {total:,} done"
    if found.diff is not None and found.diff.explain():
        text += f"; {found.diff.explain()}"
    return text
