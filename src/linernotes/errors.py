"""The one exception type for errors a user can cause (bad file, mismatched artifacts, ...)."""


class LinernotesError(Exception):
    """A problem with the user's input or artifacts; the message says what to do.

    The CLI prints it without a traceback and exits non-zero.
    """
