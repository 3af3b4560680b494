"""The one exception type the data layer raises for bad input or bad prepared data."""


class DataError(ValueError):
    """A one-line message naming the file or config field at fault and what is wrong with it."""
