"""The one base class of the errors a user fixes (a config value, an input file, an artifact).

Its subclasses live with what they describe: :class:`~deftrec.core.config.ConfigError`,
:class:`~deftrec.data.readers.InputError` and :class:`~deftrec.core.artifacts.ArtifactError`.
The entry points (``pipelines._cli``) print a ``UserError`` as one line and exit with code 2;
any other exception is a bug and keeps its traceback. So raise a ``UserError`` subclass only for
what the user can act on; a failed internal check stays a plain ``ValueError``/``RuntimeError``.
This module imports no other project module.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user fixes: a bad config value, input file or artifact (not a bug)."""
