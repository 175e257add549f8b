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
