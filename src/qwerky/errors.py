"""The one base of every user-facing error: the CLI prints its message on one line and exits with status 2.

It sits at the bottom of the package (imports nothing) so that any layer can raise it without importing upward.
Subclasses name where the problem is (data, recipe, teacher architecture); they stay ValueErrors too, so code
that caught ValueError before still does.
"""

from __future__ import annotations


class QwerkyError(Exception):
    """A problem the user must fix (a path, a file, a flag, a recipe value); its message names the fix."""
