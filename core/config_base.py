"""What every config section shares: strict pydantic sections and the accepted time forms."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from core.errors import ConfigError


def _parse_time(value: Any) -> Any:
    # Accept the forms operators type and run names use ("2000-01-05T18", "2000010518" is not
    # one of them): anything ISO-like that pandas reads, as a naive UTC datetime.
    if isinstance(value, str) and value != "latest":
        import pandas as pd

        try:
            stamp = pd.Timestamp(value)
        except ValueError as exc:
            raise ConfigError(f"{value!r} is not a date/time (use e.g. 2000-01-05T18)") from exc
        if stamp.tzinfo is not None:
            stamp = stamp.tz_convert("UTC").tz_localize(None)
        return stamp.to_pydatetime()
    return value


Moment = Annotated[datetime, BeforeValidator(_parse_time)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
