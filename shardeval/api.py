"""The Python API: ``shardeval.run``, ``resume``, ``open_run``, ``rescore`` (design.md).

``run`` follows the CLI's rules: the same run id for the same spec (so running the same cell
twice in a notebook pays once), and a run whose results are complete and current is answered
from storage without starting Prefect. Importing this module imports no Prefect.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardeval.catalog import DEFAULT_OUTPUT, open_store
from shardeval.errors import RunIncomplete, ShardevalError
from shardeval.storage import RunStore

if TYPE_CHECKING:
    import pandas as pd

    from shardeval.comparison import Comparison
    from shardeval.session import RunSession
    from shardeval.spec import EvalSpec
    from shardeval.status import RunStatus


class Run:
    """A stored run: its id, where it is, its spec, metrics and results."""

    def __init__(self, store: RunStore) -> None:
        self._store = store

    def __repr__(self) -> str:
        state = "complete" if self.metrics is not None else "incomplete"
        return f"Run({self.id!r}, {state}, url={self.url!r})"

    @property
    def id(self) -> str:
        """The run id (``<name>-<hash>``)."""
        return self._store.run_id

    @property
    def url(self) -> str:
        """The run directory's URL (a local path, or ``s3://...``)."""
        return self._store.url()

    @property
    def output(self) -> str:
        """The output the run is stored under."""
        return self._store.output

    @cached_property
    def spec(self) -> dict[str, Any]:
        """The run's spec.json: the resolved spec (no secrets), fingerprints, version."""
        record = self._store.read_json(self._store.spec_path)
        return record if isinstance(record, dict) else {}

    @property
    def metrics(self) -> dict[str, Any] | None:
        """metrics.json, or None while the run is not complete (read on each access)."""
        summary = self._store.read_json(self._store.metrics_path)
        return summary if isinstance(summary, dict) else None

    def results(self, columns: list[str] | None = None) -> pd.DataFrame:
        """results.parquet as a pandas DataFrame, from local disk or object storage."""
        table = self._store.read_table(self._store.results_path, columns=columns)
        if table is None:
            raise RunIncomplete(
                f"run {self.id} has no results.parquet yet",
                hint="finish it: shardeval.run(spec) or `shardeval run SPEC` resumes it",
            )
        return table.to_pandas()

    def status(self) -> RunStatus:
        """Progress of the run from its storage (works while another process writes it)."""
        from shardeval.status import read_status

        return read_status(self.output, self.id)


def run(
    spec: str | Path | Mapping[str, Any] | EvalSpec,
    *,
    output: str | None = None,
    run_id: str | None = None,
    fresh: bool = False,
    retry_failed: bool = False,
    limit: int | None = None,
    batch_size: int | None = None,
    concurrency: int | None = None,
    wait: bool = False,
    task_runner: str = "threads",
    dask_address: str | None = None,
) -> Run:
    """Run (or resume) an eval, exactly as ``shardeval run`` does; return the stored run.

    Raises the same errors the CLI maps to exit codes (``SpecError`` for bad input,
    ``RunIncomplete`` when batches could not finish, ``RunInterrupted`` on a stop).
    """
    from shardeval.run_id import advise_resume_by_id
    from shardeval.session import RunSession
    from shardeval.taskrunners import check_task_runner

    runner_kind = check_task_runner(task_runner, dask_address)
    source: Any = _spec_source(spec) if isinstance(spec, str | Path) else spec
    session = RunSession.prepare(
        source,
        output=output,
        run_id=run_id,
        fresh=fresh,
        retry_failed=retry_failed,
        limit=limit,
        batch_size=batch_size,
        concurrency=concurrency,
    )
    try:
        return _evaluate(session, wait=wait, task_runner=runner_kind, dask_address=dask_address)
    except ShardevalError as error:
        if fresh:  # the same call would start another run: name the one to resume
            advise_resume_by_id(error, session.run_id, python=True)
        raise


def resume(
    run_id: str,
    *,
    output: str | None = None,
    retry_failed: bool = False,
    allow_dataset_change: bool = False,
    limit: int | None = None,
    wait: bool = False,
    task_runner: str = "threads",
    dask_address: str | None = None,
) -> Run:
    """Continue a stored run from its id alone, as ``shardeval resume`` does.

    The spec comes from the run's spec.json (the API key from the environment variable it
    names). A dataset that changed since raises :class:`~shardeval.resume.DatasetChanged`
    (what changed in its message) unless ``allow_dataset_change``; a vanished one raises
    :class:`~shardeval.errors.DatasetError`.
    """
    from shardeval.resume import prepare_resume
    from shardeval.taskrunners import check_task_runner

    runner_kind = check_task_runner(task_runner, dask_address)
    session = prepare_resume(
        run_id,
        output or DEFAULT_OUTPUT,
        retry_failed=retry_failed,
        allow_dataset_change=allow_dataset_change,
        limit=limit,
    )
    return _evaluate(session, wait=wait, task_runner=runner_kind, dask_address=dask_address)


def _evaluate(
    session: RunSession, *, wait: bool, task_runner: str, dask_address: str | None
) -> Run:
    """Answer a prepared session from storage, or run its ``evaluate`` flow (run, resume)."""
    from shardeval.launch import quiet_prefect, run_evaluate

    if session.answer_from_storage() is None:
        session.preflight()
        quiet_prefect()
        run_evaluate(session, wait=wait, task_runner=task_runner, dask_address=dask_address)
    return Run(session.store)


def open_run(run_id: str, *, output: str | None = None) -> Run:
    """A run stored under ``output`` (default ``./shardeval-runs``).

    Unknown ids raise :class:`~shardeval.catalog.RunNotFound` listing the closest ones.
    """
    return Run(open_store(output or DEFAULT_OUTPUT, run_id))


def rescore(run_id: str, *, spec: str | Path | None = None, output: str | None = None) -> Run:
    """Apply ``spec``'s metrics (default: the run's own) to a run's stored responses.

    No call to the evaluated model; ``llm_judge`` metrics call their judge for new judgements.
    """
    from shardeval.launch import prefect_for_flows, quiet_prefect
    from shardeval.overrides import resolve_spec
    from shardeval.rescore import prepare_rescore

    source = None if spec is None else _spec_source(spec)
    if output is None:
        output = resolve_spec(source).output if source else DEFAULT_OUTPUT
    session = prepare_rescore(run_id, output, source)
    quiet_prefect()
    from flows.rescore import rescore as rescore_flow

    with prefect_for_flows(False):
        rescore_flow(run_id=run_id, spec=source, output=output)
    return Run(session.store)


def _spec_source(spec: str | Path) -> str:
    """A spec path made absolute (relative dataset paths resolve against it); URLs as given."""
    text = str(spec)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def compare(
    base: Run | str,
    cand: Run | str,
    *,
    output: str | None = None,
    metrics: list[str] | None = None,
    alpha: float = 0.05,
) -> Comparison:
    """Paired comparison of two complete runs, as ``shardeval compare`` makes it.

    The result has ``.verdict``, ``.to_dict()`` and ``.flips``. Runs given as ids are
    looked up under ``output`` (default: ``base``'s output when it is a :class:`Run`, else
    ``./shardeval-runs``); both must be stored under the same output.
    """
    from shardeval.compare import compare_runs

    if output is None:
        output = base.output if isinstance(base, Run) else DEFAULT_OUTPUT
    base_id = base.id if isinstance(base, Run) else base
    cand_id = cand.id if isinstance(cand, Run) else cand
    comparison, _base, _cand = compare_runs(base_id, cand_id, output, metrics=metrics, alpha=alpha)
    return comparison
