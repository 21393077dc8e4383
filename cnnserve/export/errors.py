"""The one exception the export stage raises for a user's mistake or environment.

`ExportError` carries a single-line message that the CLI prints as is, without
a traceback: an unknown model, an unwritable repository, an existing version,
a bad checkpoint, pretrained weights out of reach. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class ExportError(Exception):
    """An export that cannot proceed; the message is one line, meant for the user."""
