"""The one exception a user is meant to see: the CLI prints it as `error: ...` and exits 2."""


class UserError(Exception):
    """Bad input the user can fix: a missing folder, a wrong flag value, a checkpoint that does not fit."""


class RunError(Exception):
    """A run that cannot go on (a diverged loss): one `error: ...` line, exit code 1."""
