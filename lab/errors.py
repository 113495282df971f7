"""The lab's exception hierarchy: user mistakes surface as one clear message, not a traceback."""

from __future__ import annotations


class LabError(Exception):
    """Base class for every error the lab raises on purpose."""


class ConfigError(LabError):
    """The experiment file (or an override) is invalid; the message lists every problem."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems) if len(self.problems) == 1 else
                         "\n  - " + "\n  - ".join(self.problems))


class DataError(LabError):
    """A dataset is missing, unreadable or not in the expected format."""


class AggregationError(LabError):
    """An aggregation rule cannot run on the replies it was given."""


class ReplyError(LabError):
    """A client reply is malformed (wrong keys, shapes, dtypes or non-finite values)."""


class CaptureError(LabError):
    """A capture entry is missing, truncated or does not match the model."""


class RunError(LabError):
    """A Flower run failed or could not be started."""
