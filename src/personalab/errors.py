"""Errors personalab raises for bad input; each message is one line that names the fix."""


class PersonalabError(Exception):
    """Base class: the CLI prints the message on one line and exits with status 1."""


class UnsupportedArchitectureError(PersonalabError):
    """The decoder blocks of a model could not be located."""


class NonFiniteActivationError(PersonalabError):
    """A captured residual contains NaN or inf."""


class InvalidInputError(PersonalabError, ValueError):
    """An argument has the wrong shape, range or value."""
