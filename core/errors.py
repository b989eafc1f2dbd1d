"""Errors a user can fix, kept apart from bugs.

The rule: raise one of these classes for what the user (or operator) can fix — a config value, a
file or store that breaks its documented contract, a data source that refuses, a lock someone else
holds, an input an earlier step has not produced yet. The command line prints them as one line
(``spherecast: error: <message>``, exit 2). Anything else — a bare ``ValueError`` from an internal
invariant or from numpy/xarray deep inside — is a bug and must keep its traceback (exit 1).

Every class is also a ``ValueError``, so the ``except ValueError`` handlers that existed before this
hierarchy (HTTP 422 mapping, per-cycle failure recording, retries) keep catching them.
"""

from __future__ import annotations


class SpherecastError(Exception):
    """Base of every error the user can fix; the CLI prints it as one line and exits 2."""


class ConfigError(SpherecastError, ValueError):
    """A bad config value, config file, CLI argument or request parameter."""


class DataContractError(SpherecastError, ValueError):
    """A store, forecast, checkpoint or file that breaks its documented contract (grid, variables, manifest)."""


class SourceError(SpherecastError, ValueError):
    """A data source (CDS, ECMWF open data, a Zarr mirror, local source files) answers badly or refuses for good."""


class StoreLockedError(SpherecastError, ValueError):
    """Another process holds the writer lock of the store or run the command wants to write."""


class MissingInputError(SpherecastError, ValueError):
    """An input an earlier step makes (store, statistics, checkpoint, run, complete times) is not there yet.

    Kept apart from DataContractError because the fix differs: run that earlier step (or wait for
    the data), not repair a broken file; a poller can also wait on it without masking broken data.
    """


__all__ = ["ConfigError", "DataContractError", "MissingInputError", "SourceError", "SpherecastError",
           "StoreLockedError"]
