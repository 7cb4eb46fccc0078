"""Exceptions for bad input that a user can fix; the CLI prints them as one line."""


class T2IError(Exception):
    """Base class: the message alone tells the user what is wrong and where."""


class DataError(T2IError):
    """A dataset or a source file that cannot be used as it is."""


class CorruptRecordError(DataError):
    """A dataset record whose bytes fail their checks; the message names the file and key."""


class ConfigError(T2IError, ValueError):
    """An option outside its range or at odds with the dataset (a ValueError to Python)."""
