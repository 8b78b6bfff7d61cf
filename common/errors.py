"""Errors that end a command with a one-line message and a documented exit code."""

from __future__ import annotations

# Exit codes, shared by every console script (README: "Exit codes").
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # bad flags, bad files, a workdir that disagrees, a lock held by another process
EXIT_DIVERGED = 3  # training produced a non-finite loss or weights
EXIT_NO_DATA = 4  # the dataset could not be found or fetched
EXIT_IO = 5  # the workdir could not be written (disk full, permissions changed mid-run)
EXIT_WORKER_LOST = 6  # a worker of a multi-worker job was lost (killed, hung or unreachable)


class ProjectError(Exception):
    """An expected failure: printed as one line, then the process exits with `exit_code`."""

    exit_code = 1


class UsageError(ProjectError):
    """Bad input from the user: flags, files or a workdir that does not fit."""

    exit_code = EXIT_BAD_INPUT


class BucketUnusable(UsageError):
    """A bucket that does not exist, or that these credentials may not use.

    It reads as `--workdir URL: why`; a flag that named the bucket otherwise (`--from`,
    `--init-from`, `predict --model`) rewords it with `for_flag`.
    """

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"--workdir {url}: {why}")
        self.url, self.why = url, why

    def for_flag(self, flag: str, value: object) -> UsageError:
        """The same refusal, said of `flag value` (a URL in the bucket, which the reason names)."""
        return UsageError(f"{flag} {value}: {self.why}")


class DataFormatError(UsageError):
    """A dataset file exists but is not valid IDX (or npz) data."""


class DataNotFoundError(ProjectError):
    """No source of the dataset worked."""

    exit_code = EXIT_NO_DATA


class DivergedError(ProjectError):
    """Training produced a non-finite loss; nothing from that point was saved."""

    exit_code = EXIT_DIVERGED


class WorkdirIOError(ProjectError):
    """Writing into the workdir failed (disk full, read-only, permissions)."""

    exit_code = EXIT_IO


class WorkerLostError(ProjectError):
    """Another worker of a multi-worker job stopped answering; this one cannot go on alone."""

    exit_code = EXIT_WORKER_LOST
