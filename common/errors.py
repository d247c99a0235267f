"""One error type for mistakes a user can fix (DESIGN contract 5).

The CLI prints a `UserError` as one line and exits non-zero without a traceback; any other
exception is a bug in sparsecnn and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment; the message names the thing and the fix."""

    exit_code = 2
