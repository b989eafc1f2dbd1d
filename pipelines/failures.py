"""How orchestration treats a failure: retry only what may pass, and log a user's error as one line.

Prefect retries a failed task ``retries`` times and logs each failure with its traceback. For what
the user must fix (a bad source file, a missing time, missing credentials, a full disk) that only
adds minutes and screens of tracebacks before the same error: such failures are not retried, and
their log records keep the message but drop the traceback. A bug (any other exception) keeps both.
"""

from __future__ import annotations

import logging
from typing import Any

from core.errors import is_permanent

PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task unless its exception is permanent (core.errors)."""
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, BaseException) and is_permanent(exc))


class UserErrorsAsOneLine(logging.Filter):
    """Drop the traceback from a log record whose exception is permanent (the message already says it all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record; strip ``exc_info`` from those about a user-fixable error."""
        info = record.exc_info
        if info and info[1] is not None and is_permanent(info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors() -> None:
    """Install :class:`UserErrorsAsOneLine` on Prefect's task- and flow-run loggers (once)."""
    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorsAsOneLine) for f in logger.filters):
            logger.addFilter(UserErrorsAsOneLine())
