"""Errors a user can fix, kept apart from bugs.

The rule: raise one of these classes for what the user (or operator) can fix — a config value, a
file or store that breaks its documented contract, a data source that refuses, a lock someone else
holds, an input an earlier step has not produced yet. The command line prints them as one line
(``spherecast: error: <message>``, exit 2). Anything else — a bare ``ValueError`` from an internal
invariant or from numpy/xarray deep inside — is a bug and must keep its traceback (exit 1).

Every class but StoreWriteError (an ``OSError``) is also a ``ValueError``, so the ``except ValueError`` handlers that existed before this
hierarchy (HTTP 422 mapping, per-cycle failure recording, retries) keep catching them.
"""

from __future__ import annotations

import errno


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


class TransientSourceError(SourceError):
    """A source that failed after its own bounded retries for a reason that may pass (network, HTTP 5xx, 429).

    The one kind of user-facing error an orchestrator may retry later; every other SpherecastError is
    permanent: the same input fails the same way until someone fixes it.
    """


class StoreWriteError(SpherecastError, OSError):
    """Writing the store failed in a way the operator fixes (disk full, quota, read-only mount); an OSError too."""


# errno values that no retry fixes: the disk, the quota or the mount must change first.
_PERMANENT_ERRNO = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help: a user-fixable error that is not transient, or a full or read-only disk."""
    if isinstance(exc, TransientSourceError):
        return False
    if isinstance(exc, SpherecastError):
        return True
    return isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNO


__all__ = ["ConfigError", "DataContractError", "MissingInputError", "SourceError", "SpherecastError",
           "StoreLockedError", "StoreWriteError", "TransientSourceError", "is_permanent"]
