"""One error type for everything a user can fix: it names the problem and the fix."""


class SitError(Exception):
    """A problem the user can act on. `str()` gives both the problem and the fix."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  Fix: {fix}")

    def __reduce__(self):
        # A SitError raised in another process (a Ray worker) arrives with its problem and fix apart.
        return type(self), (self.problem, self.fix)


class ConfigError(SitError):
    """The configuration is invalid; raised before any model loads."""


class NotEnoughDataError(SitError):
    """A stage produced fewer records than the next stage needs."""


class RunLockedError(SitError):
    """Another live process holds the run directory."""


class ResumeMismatchError(SitError):
    """The run directory holds work made with a different configuration."""


class CorruptFileError(SitError, ValueError):
    """A run-directory file is damaged beyond the documented recovery (a torn last line)."""
