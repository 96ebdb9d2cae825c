"""The one exception every stage's user-facing errors derive from.

A UserError is a problem the user can fix (a bad file, a flag that cannot work, a loss that
blew up). The command-line entry points print its message as one line and exit with status 2;
anything else is a bug in minisft and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's data, flags or run, worded for the user."""
