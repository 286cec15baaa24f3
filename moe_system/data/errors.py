"""The one exception type of the data package."""


class DataError(ValueError):
    """A problem with a data set or tokenizer that the user can fix; the message says how."""
