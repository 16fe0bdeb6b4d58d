"""Errors a user can cause; the CLI prints them as one line without a traceback."""


class EmtwinError(Exception):
    """Base class of user-facing errors (bad recipe, bad profile, bad file)."""


class RecipeError(EmtwinError):
    """A recipe or instrument profile is malformed or out of range."""
