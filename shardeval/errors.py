"""The errors shardeval raises on purpose, and the exit code each one maps to.

One shallow hierarchy, so the CLI can tell a user's mistake from a bug::

    ShardevalError                 exit 1 unless a subclass says otherwise
    ├── SpecError                  exit 2: the spec file or a CLI option is wrong
    │   └── EndpointError              exit 2: the endpoint, model name or key is wrong
    ├── DatasetError               exit 2: the dataset cannot be read or has bad rows
    ├── PromptError                exit 2: a template fails on an item
    ├── MetricError                exit 2: a metric is misconfigured
    ├── ProviderError              a model call failed
    │   ├── TransientProviderError     worth retrying (timeouts, 429, 5xx, connection)
    │   │   └── ConnectionFailedError      no answer at all (refused, DNS, reset)
    │   └── PermanentProviderError     not worth retrying (other 4xx); stored as an error row
    ├── StorageError               exit 1: the output store failed; what was committed stays
    ├── RunLockedError             exit 1: another process holds the run
    ├── RunIncomplete              exit 1: some batches could not finish; rerun to resume
    │   └── EndpointUnreachable        exit 1: the endpoint went away mid-run
    └── RunInterrupted             exit 130: Ctrl-C / SIGTERM, after saving what finished

Every error carries the context a person needs to act (file:line, spec field path, item id,
metric name) in its message, and an optional ``hint`` printed as "to resolve this".
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ShardevalError(Exception):
    """Base class of every error shardeval raises deliberately."""

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  to resolve this: {self.hint}"
        return self.message


class SpecError(ShardevalError):
    """The eval spec or a command-line option is invalid."""

    exit_code = EXIT_USAGE


class EndpointError(SpecError):
    """The model endpoint cannot work as configured: wrong base_url, model name or API key.

    Found by the preflight check before the first batch, or by the first 401/403 of a run;
    the message names the spec field (or environment variable) to fix.
    """


class DatasetError(ShardevalError):
    """The dataset cannot be read, or one of its rows is malformed."""

    exit_code = EXIT_USAGE


class PromptError(ShardevalError):
    """A prompt template cannot be rendered for an item."""

    exit_code = EXIT_USAGE


class MetricError(ShardevalError):
    """A metric is misconfigured (unknown type, bad parameter, missing target field)."""

    exit_code = EXIT_USAGE


class ProviderError(ShardevalError):
    """A model call failed.

    Attributes:
        status: the HTTP status when there was one.
        retry_after: seconds the server asked us to wait, if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.retry_after = retry_after


class TransientProviderError(ProviderError):
    """A failure that may pass: never stored as a final result, a rerun retries it."""


class ConnectionFailedError(TransientProviderError):
    """Nothing answered at all (refused, DNS, reset).

    What the run's circuit breaker counts, as opposed to answers that were errors.
    """


class PermanentProviderError(ProviderError):
    """A failure that will not pass by retrying: stored as an error row."""


class StorageError(ShardevalError):
    """The output store failed; everything already committed is kept."""


class RunLockedError(ShardevalError):
    """Another live process is writing the same run."""


class RunIncomplete(ShardevalError):
    """Some batches failed (e.g. the endpoint stayed down); what finished is kept."""


class EndpointUnreachable(RunIncomplete):
    """Every request failed to connect for a while: the run stopped sending and saved."""


class RunInterrupted(ShardevalError):
    """The run was stopped by a signal after saving what had finished."""

    exit_code = EXIT_INTERRUPTED
