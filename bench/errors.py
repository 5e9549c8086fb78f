"""Errors that mean "the user's input is wrong": the CLI prints them in one line and exits 2."""


class FusebenchError(ValueError):
    """Bad input (config, spec, data set, checkpoint, study...). The message names the problem."""


class ConfigError(FusebenchError):
    """A config or sweep spec that cannot be used: the message names the file and the key."""
