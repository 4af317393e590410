"""The errors a user can act on. The command line prints any of them as one line and exits with 2;
anything else is a bug of ours and keeps its traceback."""


class DDPError(Exception):
    """Base class: the message says what went wrong and how to fix it."""


class ConfigError(DDPError, ValueError):
    """A value the run cannot use: a field of TrainConfig, a --config file, a launcher's variable."""


class SetupError(DDPError, OSError):
    """Something the run needs from the machine is not there: a port, a folder, free disk space."""


class DiskFullError(SetupError):
    """A file could not be written: no space left on its device (or over a quota). What was there
    before is intact: every file of ours is written beside its old version and renamed over it."""

    def __init__(self, path, what: str):
        self.path, self.what = path, what
        super().__init__(f"no space left on the device of {path.parent} while writing {what} {path.name}")
