"""The base of every user error, and the one the data layer raises.

A `UserError` is a problem with what the user gave (a config key, a file, a flag): its message is one line
naming it, and the CLI turns it into `zerotrain: error: ...` with exit code 2. It lives in the lowest layer so
that every layer's refusals (`DataError` here, the trainer's `ConfigError`, the launcher's) share it.
"""


class UserError(ValueError):
    """A one-line message naming the key, file or flag at fault and what is wrong with it."""


class DataError(UserError):
    """Bad input data or bad prepared data."""
