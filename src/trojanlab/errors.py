"""Errors raised by trojanlab for bad input: each names the offending file or value and the problem."""

from __future__ import annotations


class TrojanlabError(Exception):
    """Base class of every error trojanlab raises on purpose."""


class DataError(TrojanlabError, ValueError):
    """A data set is missing, corrupt, empty or has the wrong shape, dtype or labels."""


class ArtifactError(TrojanlabError, ValueError):
    """A model artefact (safetensors + JSON spec) is missing, corrupt or inconsistent."""


class ConfigError(TrojanlabError, ValueError):
    """A parameter is out of range (a label, a trigger location, a size...)."""


class RunFolderError(ConfigError):
    """An output folder holds another run (other settings, inputs or command) or files no trojanlab run wrote."""


class Interrupted(TrojanlabError):
    """The user interrupted a run (Ctrl-C); the message says what was kept and how to resume."""
