"""Request and response schemas of the recommendation API (Pydantic; they are the OpenAPI document).

Requests are validated in strict mode: a value of the wrong JSON type is refused (422), never
coerced (no ``true`` as user ``"1"`` or ``k = 1``, no ``0`` as ``exclude_history = false``, no
boolean or float as an item id).
"""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

MAX_HISTORY_ITEMS = 500  # longer histories are refused (422); the model only reads the last max_history
Id = Union[StrictStr, StrictInt]


# What _need_user_or_history checks, in the OpenAPI document too: a client (or a fuzzer) reading
# the schema knows that an empty body is refused.
_USER_OR_HISTORY = {"anyOf": [{"required": ["user_id"], "properties": {"user_id": {"type": ["string", "integer"]}}},
                              {"required": ["history"], "properties": {"history": {"type": "array"}}}]}


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_USER_OR_HISTORY)

    user_id: Optional[Id] = Field(None, description="a known user; their stored history is used unless `history` is given")
    history: Optional[list[Id]] = Field(None, min_length=1, max_length=MAX_HISTORY_ITEMS,
                                        description="item ids, oldest first")
    k: int = Field(10, ge=1, le=100, description="number of recommendations")
    exclude_history: bool = Field(True, description="never recommend items already in the history")
    explain: bool = Field(False, description="also return the generated reasoning text")

    @model_validator(mode="after")
    def _need_user_or_history(self):
        if self.user_id is None and self.history is None:
            raise ValueError("give user_id or history (or both: history then replaces the stored one)")
        return self


class Item(BaseModel):
    item_id: str
    title: str
    category: str


class ScoredItem(Item):
    score: float


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    reasoning: Optional[str] = None
    model_version: str
    index_version: str
    timings_ms: dict[str, float]


class Health(BaseModel):
    status: str
    version: str = Field(description="content id of the served model, index and catalog (the user_config's version)")
    model_version: str
    index_version: str
    items: int
    refused_version: Optional[str] = Field(
        None, description="the version named by the last user_config update this replica refused, while it kept "
                          "serving `version`; null when the last update was accepted (or the refused one named none)")
    refused_reason: Optional[str] = Field(
        None, description="why the last user_config update was refused; null when it was accepted")
