"""Errors a user can fix: printed as one line, never a traceback."""


class UserError(Exception):
    """Message for the user; `code` is the process exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
