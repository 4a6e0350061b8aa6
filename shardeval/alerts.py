"""Tell someone when tonight's run is worse: a Prefect artifact, an event, an Automation.

* :func:`publish_comparison`, called inside a flow run after a comparison, creates a markdown
  artifact (the table and the top broken items) and emits one Prefect event:
  ``shardeval.regression.detected`` when any metric regressed, ``shardeval.run.completed``
  otherwise. The event's resource is the run (``shardeval.run.<run_id>``), the baseline is a
  related resource, and the payload holds what a message needs (see docs/alerts.md).
* :func:`install_automation` (``shardeval alerts install --block NAME``) creates, or updates
  in place, an Automation that sends a message through an existing notification block
  (Slack, Teams, email, custom webhook) when the regression event arrives.

Prefect is imported inside the functions: ``import shardeval`` stays Prefect-free. Nothing here
carries a secret: the payload holds names, figures and storage paths, never a key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shardeval.errors import EXIT_USAGE, ShardevalError

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.automations import AutomationCore

    from shardeval.comparison import Comparison

REGRESSION_EVENT = "shardeval.regression.detected"
COMPLETED_EVENT = "shardeval.run.completed"
DEFAULT_AUTOMATION = "shardeval-regression"
ARTIFACT_FLIPS = 10
SUBJECT = "shardeval: {{ event.payload.eval }} regressed on {{ event.payload.metric }}"
BODY = (
    "Eval {{ event.payload.eval }}, model {{ event.payload.model }}: "
    "{{ event.payload.metric }} changed by {{ event.payload.delta }} "
    "(95% CI {{ event.payload.ci95 }}, p adjusted {{ event.payload.p_adjusted }}, "
    "{{ event.payload.broken }} broken) in run {{ event.payload.run_id }} "
    "against {{ event.payload.base }}.\n"
    "Regressed metrics: {{ event.payload.regressed | join(', ') }}\n"
    "Results: {{ event.payload.results }}\nMetrics: {{ event.payload.metrics }}"
)
"""The Automation's message: Jinja over the triggering event, rendered by the Prefect server."""


class AlertSetupError(ShardevalError):
    """The notification block or the Prefect server needed for alerts is missing (exit 2)."""

    exit_code = EXIT_USAGE


def run_info(metrics: Mapping[str, Any], *, results_url: str, metrics_url: str) -> dict[str, Any]:
    """What :func:`publish_comparison` needs of the candidate run, from its metrics.json."""
    model = metrics.get("model")
    return {
        "run_id": metrics.get("run_id"),
        "eval": metrics.get("name"),
        "model": model.get("model") if isinstance(model, Mapping) else model,
        "results": results_url,
        "metrics": metrics_url,
    }


def event_payload(comparison: Comparison, info: Mapping[str, Any]) -> dict[str, Any]:
    """The event's payload: the run, and the worst regressed metric (else the first one)."""
    regressed = [n for n, m in comparison.metrics.items() if m.verdict == "regression"]
    worst_name = min(regressed, key=lambda n: comparison.metrics[n].delta or 0.0, default=None)
    if worst_name is None:
        worst_name = next(iter(comparison.metrics), None)
    worst = comparison.metrics.get(worst_name) if worst_name else None
    return {
        "eval": info.get("eval"),
        "model": info.get("model"),
        "run_id": comparison.cand,
        "base": comparison.base,
        "verdict": comparison.verdict,
        "regressed": regressed,
        "metric": worst_name,
        "delta": worst.delta if worst else None,
        "ci95": worst.ci95 if worst else None,
        "p": worst.p if worst else None,
        "p_adjusted": worst.p_adjusted if worst else None,
        "broken": worst.broken if worst else None,
        "fixed": worst.fixed if worst else None,
        "n_aligned": comparison.n_aligned,
        "results": info.get("results"),
        "metrics": info.get("metrics"),
        "comparison": comparison.to_dict()["metrics"],
    }


def comparison_markdown(comparison: Comparison, info: Mapping[str, Any]) -> str:
    """The artifact: a metrics table, warnings, then the top broken items of each metric."""
    lines = [
        f"# {info.get('eval') or 'eval'}: {comparison.cand} vs {comparison.base}",
        "",
        f"Model `{info.get('model')}` · verdict **{comparison.verdict}** · "
        f"{comparison.n_aligned:,} rows aligned ({comparison.only_base:,} only in the base, "
        f"{comparison.only_cand:,} only in the candidate)",
        "",
        "| metric | base | cand | delta | 95% CI | p (adj) | test | fixed/broken | MDE | verdict |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for name, m in comparison.metrics.items():
        ci = "-" if m.ci95 is None else f"[{m.ci95[0]:+.4f}, {m.ci95[1]:+.4f}]"
        lines.append(
            f"| {name} | {_num(m.base)} | {_num(m.cand)} | "
            + ("-" if m.delta is None else f"{m.delta:+.4f}")
            + f" | {ci} | "
            + ("-" if m.p_adjusted is None else f"{m.p_adjusted:.3g}")
            + f" | {m.test} | {m.fixed}/{m.broken} | {_num(m.mde)} | **{m.verdict}** |"
        )
    lines += [f"\n> warning: {w}" for w in comparison.warnings]
    for name, flips in comparison.flips.items():
        broken = flips["broken"][:ARTIFACT_FLIPS]
        if not broken:
            continue
        lines += [
            "",
            f"## {name}: broken items (first {len(broken)} of {comparison.metrics[name].broken})",
            "",
            "| item | target | base response | candidate response |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {_cell(f.item_id)} | {_cell(f.target)} | {_cell(f.base_response)} | "
            f"{_cell(f.cand_response)} |"
            for f in broken
        ]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _cell(text: str | None, limit: int = 80) -> str:
    if text is None:
        return "-"
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def artifact_key(name: str | None) -> str:
    """A stable key per eval (lowercase, digits, dashes): the UI shows one artifact's history."""
    slug = re.sub(r"[^a-z0-9]+", "-", (name or "eval").lower()).strip("-") or "eval"
    return f"shardeval-comparison-{slug}"


def publish_comparison(
    comparison: Comparison, run_info: Mapping[str, Any], *, key: str | None = None
) -> dict[str, Any]:
    """Create the comparison artifact and emit the regression (or completed) event.

    Meant for inside a flow run (the artifact and the event are linked to it). ``run_info`` is
    :func:`run_info` of the candidate; ``key`` the artifact's (default: one per eval).
    Returns ``{"event", "id", "payload", "artifact_id"}``.
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    artifact_id = create_markdown_artifact(
        markdown=comparison_markdown(comparison, run_info),
        key=key or artifact_key(run_info.get("eval")),
        description=f"{comparison.cand} vs {comparison.base}: {comparison.verdict}",
    )
    name = REGRESSION_EVENT if comparison.verdict == "regression" else COMPLETED_EVENT
    payload = event_payload(comparison, run_info)
    event = emit_event(
        event=name,
        resource={
            "prefect.resource.id": f"shardeval.run.{comparison.cand}",
            "prefect.resource.name": comparison.cand,
        },
        related=[
            {
                "prefect.resource.id": f"shardeval.run.{comparison.base}",
                "prefect.resource.name": comparison.base,
                "prefect.resource.role": "baseline",
            }
        ],
        payload=payload,
    )
    return {
        "event": name,
        "id": str(event.id) if event is not None else None,
        "payload": payload,
        "artifact_id": str(artifact_id),
    }


def publish_completed(run_info: Mapping[str, Any]) -> str | None:
    """Emit ``shardeval.run.completed`` for a run compared with nothing (no baseline yet)."""
    from prefect.events import emit_event

    run_id = str(run_info.get("run_id"))
    event = emit_event(
        event=COMPLETED_EVENT,
        resource={
            "prefect.resource.id": f"shardeval.run.{run_id}",
            "prefect.resource.name": run_id,
        },
        payload={**run_info, "verdict": None},
    )
    return str(event.id) if event is not None else None


# ------------------------------------------------------------------------------ the automation
def install_automation(block: str, name: str = DEFAULT_AUTOMATION) -> tuple[UUID, bool]:
    """Create or update the Automation that notifies through ``block``; (id, created).

    Args:
        block: The notification block: ``NAME`` or ``BLOCK_TYPE_SLUG/NAME``
            (e.g. ``slack-webhook/nightly``).
        name: The Automation's name; an existing Automation of that name is updated in place.

    Raises:
        AlertSetupError: no Prefect server is configured, or no such notification block.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise AlertSetupError(
            "alerts need a Prefect server: PREFECT_API_URL is not set",
            hint="start one (`prefect server start`) and set PREFECT_API_URL, "
            "or `prefect config set PREFECT_API_URL=...`",
        )
    try:
        with get_client(sync_client=True) as client:
            return _install(client, block, name)
    except (PrefectHTTPStatusError, httpx.HTTPError) as exc:
        raise ShardevalError(
            f"could not install automation {name!r} on the Prefect server at {api_url}: {exc}",
            hint="check that the server is up (`prefect server start`) and PREFECT_API_URL",
        ) from exc


def build_automation(block_document_id: UUID, name: str = DEFAULT_AUTOMATION) -> AutomationCore:
    """The Automation: on each regression event of any shardeval run, notify through the block."""
    from datetime import timedelta

    from prefect.automations import AutomationCore, EventTrigger, Posture, SendNotification

    return AutomationCore(
        name=name,
        description="shardeval: notify when a run's comparison with its baseline regresses",
        enabled=True,
        trigger=EventTrigger(
            expect={REGRESSION_EVENT},
            match={"prefect.resource.id": "shardeval.run.*"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)],
    )


def _install(client: Any, block: str, name: str) -> tuple[UUID, bool]:
    automation = build_automation(_notification_block_id(client, block), name)
    existing = client.read_automations_by_name(name=name)
    if existing:  # update in place: installing twice must not notify twice
        client.update_automation(existing[0].id, automation)
        return existing[0].id, False
    return client.create_automation(automation), True


def _notification_block_id(client: Any, block: str) -> UUID:
    """The block document id of a notification block named ``NAME`` or ``SLUG/NAME``."""
    from prefect.exceptions import ObjectNotFound

    slug, _, block_name = block.rpartition("/")
    documents = client.read_block_documents(include_secrets=False)
    notifiers = [d for d in documents if "notify" in _caps(d)]
    if slug:
        try:
            document = client.read_block_document_by_name(
                name=block_name, block_type_slug=slug, include_secrets=False
            )
        except ObjectNotFound:
            document = None
        matches = [document] if document is not None and "notify" in _caps(document) else []
    else:
        matches = [d for d in notifiers if d.name == block_name]
    if len(matches) == 1:
        return matches[0].id  # type: ignore[no-any-return]
    known = ", ".join(sorted(_slug_name(d) for d in notifiers)) or "none"
    if len(matches) > 1:
        raise AlertSetupError(
            f"several notification blocks are named {block_name!r}: {known}",
            hint="pass --block BLOCK_TYPE_SLUG/NAME",
        )
    raise AlertSetupError(
        f"no notification block {block!r} on the Prefect server; notification blocks there: "
        + known,
        hint="create one first (docs/alerts.md), e.g. a Slack webhook or a custom webhook block",
    )


def _slug_name(document: Any) -> str:
    block_type = getattr(document, "block_type", None)
    return f"{getattr(block_type, 'slug', '?')}/{document.name}"


def _caps(document: Any) -> list[str]:
    schema = getattr(document, "block_schema", None)
    return list(getattr(schema, "capabilities", None) or [])
