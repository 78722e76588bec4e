"""Errors personalab raises for bad input; each message is one line that names the fix.

A message names a parameter in backticks (`` `min_pairs` ``), the Python name; the command line prints
it as its flag (``--min-pairs``) through ``as_flags``.
"""

import re

_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")


def as_flags(message: str) -> str:
    """``message`` with each backticked parameter name written as its command-line flag."""
    return _PARAMETER.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def invalid_option(errors: list[dict]) -> str:
    """The first of pydantic's ``ValidationError.errors()`` as one line naming the option: ``invalid `name`: why``."""
    first = errors[0]
    message = first["msg"].removeprefix("Value error, ")
    names = [part for part in first["loc"] if isinstance(part, str)]
    return f"invalid `{names[-1]}`: {message}" if names else message


class PersonalabError(Exception):
    """Base class: the CLI prints the message on one line and exits with status 1."""


class UnsupportedArchitectureError(PersonalabError):
    """The decoder blocks of a model could not be located."""


class NonFiniteActivationError(PersonalabError):
    """A captured residual contains NaN or inf."""


class InvalidInputError(PersonalabError, ValueError):
    """An argument has the wrong shape, range or value."""


class PersonalabWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it as one ``warning:`` line."""
