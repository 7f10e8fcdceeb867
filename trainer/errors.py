"""User-facing trainer errors: the entry points print one line, never a traceback."""


class TrainerError(Exception):
    """A mistake the user can fix; the message says what to change."""
