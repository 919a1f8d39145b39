"""The errors a conversion raises for what its user can fix; every layer below the route raises
them, and the command line turns them into one line and exit status 2."""

from __future__ import annotations


class ConversionError(ValueError):
    """What the user asked for cannot be converted; the message says why and what to do."""


class LibraryFailure(ConversionError):
    """coremltools or torch failed on the model itself: what they printed before failing is
    part of the explanation, so the command line shows it with the error."""


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
