"""The base of every request schema: strict types, finite numbers, unknown fields kept and logged."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger("ctxsteer.server.protocol")


class OpenAIBaseModel(BaseModel):
    """Request base: strict types, finite numbers, unknown fields kept (and logged) instead of rejected."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    def model_post_init(self, context: Any, /) -> None:
        if self.model_extra:
            logger.info("ignoring unknown %s fields: %s", type(self).__name__, sorted(self.model_extra))
