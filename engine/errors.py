"""Errors a user can cause. Each message is one line that names the culprit and the fix."""


class SpadeError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class DataError(SpadeError):
    """A missing, unreadable or mis-laid-out input file or folder."""


class BankError(SpadeError):
    """A reference bank that is missing, corrupt, or incompatible with the model."""


class WeightsError(SpadeError):
    """Backbone weights that cannot be found offline."""


class ConfigError(SpadeError):
    """A configuration value that is unknown or of the wrong type."""
