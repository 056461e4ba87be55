"""The one exception type whose message is meant for a person, not a developer.

Every failure a user can cause or fix (a bad file, a missing model, a wrong setting) is raised as
``StudioError`` with a message that says what is wrong, where, and what to do. The CLI prints it
without a traceback and the UI shows it in the page; anything else is a bug and keeps its traceback.
"""


class StudioError(Exception):
    """A problem the user can understand and fix; ``str(err)`` is the whole message."""


class BusyError(StudioError):
    """Another run is already training; only one runs at a time."""
