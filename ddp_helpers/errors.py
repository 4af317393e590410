"""The errors a user can act on. The command line prints any of them as one line and exits with 2;
anything else is a bug of ours and keeps its traceback."""


class DDPError(Exception):
    """Base class: the message says what went wrong and how to fix it."""


class ConfigError(DDPError, ValueError):
    """A value the run cannot use: a field of TrainConfig, a --config file, a launcher's variable."""


class SetupError(DDPError, OSError):
    """Something the run needs from the machine is not there: a port, a folder, free disk space."""
