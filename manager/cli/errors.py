"""The domain's errors as the CLI says them: a message on stderr and an exit code."""

from __future__ import annotations

from types import TracebackType

import click

from manager.errors import DomainError, Invalid

# Bad input exits 2, as click's own usage errors do; any other refusal exits 1.
EXIT_INVALID = 2


class DomainFailure(click.ClickException):
    """A domain error as click prints it: `Error: <message>`, exit code 1."""

    def __init__(self, exc: DomainError) -> None:
        super().__init__(exc.message)


class InvalidInput(DomainFailure):
    """Bad input, exit code 2."""

    exit_code = EXIT_INVALID


def failure(exc: DomainError) -> DomainFailure:
    return InvalidInput(exc) if isinstance(exc, Invalid) else DomainFailure(exc)


class domain_errors:  # noqa: N801 - used as a context manager, reads as a phrase
    """Turn a domain error raised inside the block into a click error."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, DomainError):
            raise failure(exc) from None
