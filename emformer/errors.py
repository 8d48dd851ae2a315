"""Errors that users see. Each names the file or key at fault and what was expected."""


class EmformerError(Exception):
    """Base class: the CLI prints these as one clear line, without a traceback."""


class ConfigError(EmformerError):
    """A config key is unknown, mistyped or out of range."""


class DataError(EmformerError):
    """A shard, manifest or input array is missing, corrupt or inconsistent with the config."""


class CheckpointError(EmformerError):
    """A checkpoint is corrupt or does not fit the model being built."""


DEEPSPEED_INSTALL = "pip install -e '.[deepspeed]'"
"""the one install hint for the optional DeepSpeed dependency, in every error that needs it"""
