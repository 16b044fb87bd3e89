"""User-facing errors.

Every error a user can cause (bad recipe, missing file, wrong model family, unreadable data) is raised as a
:class:`TunerError` whose message names the thing at fault and the fix. The CLI prints the message without
a traceback and exits with status 2; anything else escaping is a bug in tuner.
"""

from __future__ import annotations


class TunerError(Exception):
    """An error caused by input the user can fix. The message is shown as is."""


class RecipeError(TunerError):
    """One or more problems in a recipe; all of them, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the recipe:\n{lines}")


class DataError(TunerError):
    """A dataset that cannot be used (empty, unreadable in strict mode, bad captions)."""


class FormatError(TunerError):
    """An adapter or model file that cannot be read or does not fit the model it is applied to."""
