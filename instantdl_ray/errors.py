"""Errors a user can act on. Each carries every problem found, not only the first."""

from __future__ import annotations


class InstantDLError(Exception):
    """Base class: the CLI prints these without a traceback and exits with ``exit_code``."""

    exit_code = 2  # a problem with the input: fix it and run again

    def __init__(self, problems: list[str] | str, title: str = "Problem"):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.title = title
        super().__init__(self.format())

    def format(self) -> str:
        n = len(self.problems)
        head = f"{self.title}: {n} problem{'s' if n != 1 else ''} found"
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class ConfigError(InstantDLError):
    def __init__(self, problems, title: str = "Invalid configuration"):
        super().__init__(problems, title)


class DataError(InstantDLError):
    def __init__(self, problems, title: str = "Invalid data"):
        super().__init__(problems, title)


class WeightsError(InstantDLError):
    def __init__(self, problems, title: str = "Cannot load pretrained weights"):
        super().__init__(problems, title)


class TrainingError(InstantDLError):
    """Training stopped for a reason the user must fix (e.g. a loss that is NaN or infinite)."""

    def __init__(self, problems, title: str = "Training stopped"):
        super().__init__(problems, title)


class RunFailed(InstantDLError):
    """A run failed after validation for a reason that is not the input's (recorded in run.json;
    the traceback is in the run's log)."""

    exit_code = 1

    def __init__(self, problems, title: str = "Run failed"):
        super().__init__(problems, title)


# OSErrors that a retry on the same machine cannot fix: a full disk or quota, no permission, a
# read-only file system
PERMANENT_ERRNOS = {"ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS"}
# Python errors that come from the code or the input, not from a lost worker or node: the same
# step raises them again. RuntimeError is not among them: torch raises it when a peer rank died.
PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, ImportError, KeyError, IndexError, ValueError,
                      ZeroDivisionError, AssertionError, NotImplementedError)


def permanent_failure(e: BaseException) -> str | None:
    """Why ``e`` will fail again on a retry (``"input"``, ``"disk"`` or ``"code"``), or None for
    errors a restarted worker may get past (a lost worker or node, a collective a dead peer
    aborted). Ray Train's ``max_failures`` is for the latter only."""
    import errno as _errno

    if isinstance(e, InstantDLError):
        return "input"
    if isinstance(e, OSError) and _errno.errorcode.get(e.errno or -1) in PERMANENT_ERRNOS:
        return "disk"
    if isinstance(e, PROGRAMMING_ERRORS):
        return "code"
    return None
