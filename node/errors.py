"""The one exception type a user sees: its message is printed as a single line, no traceback."""


class RinginferError(Exception):
    """Bad input or an unmet precondition that the user can fix (path, flag, model, prompt)."""
