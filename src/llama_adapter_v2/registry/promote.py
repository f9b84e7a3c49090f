"""Gated promotion: the alias moves only to an evaluated version that beats the champion.

Every decision (promoted, kept, refused) is written as tags on the challenger version with the
numbers it was based on, so the registry itself explains why an alias points where it does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from mlflow.exceptions import MlflowException

from llama_adapter_v2.config import Config
from llama_adapter_v2.registry.register import METRIC_TAG_PREFIX, TAG_EVALUATION
from llama_adapter_v2.store import use_tracking

Outcome = Literal["promoted", "kept", "refused"]


@dataclass(frozen=True)
class PromotionDecision:
    outcome: Outcome
    version: str
    alias: str
    metric: str
    challenger_value: float | None
    champion_version: str | None
    champion_value: float | None
    margin: float
    reason: str

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    def as_tags(self) -> dict[str, str]:
        return {
            "promotion.outcome": self.outcome,
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.challenger_value": repr(self.challenger_value),
            "promotion.champion_version": str(self.champion_version),
            "promotion.champion_value": repr(self.champion_value),
            "promotion.margin": repr(self.margin),
            "promotion.decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def _metric_of(tags: dict[str, str], metric: str) -> float | None:
    raw = tags.get(f"{METRIC_TAG_PREFIX}{metric}")
    return None if raw is None else float(raw)


def beats(challenger: float, champion: float, margin: float, greater_is_better: bool) -> bool:
    """Strictly better by more than ``margin`` in the configured direction."""
    gain = challenger - champion if greater_is_better else champion - challenger
    return gain > margin


def _refusal(tags: dict[str, str], status: str, metric: str) -> str | None:
    if status != "READY":
        return f"version status is {status}, not READY"
    evaluation = tags.get(TAG_EVALUATION, "missing")
    if evaluation != "passed":
        return f"evaluation is {evaluation}: only evaluated versions can be promoted"
    value = _metric_of(tags, metric)
    if value is None or not math.isfinite(value):
        return f"metric {metric} is {value}: unevaluated on the promotion metric"
    return None


def decide(cfg: Config, version: str) -> PromotionDecision:
    """Compare ``version`` with the current alias holder; changes nothing."""
    rule = cfg.tracking.promotion
    client = use_tracking(cfg)
    name = cfg.tracking.registered_model
    challenger = client.get_model_version(name, version)
    value = _metric_of(challenger.tags, rule.metric)
    common = {"version": str(version), "alias": rule.alias, "metric": rule.metric, "margin": rule.margin}
    if reason := _refusal(challenger.tags, challenger.status, rule.metric):
        return PromotionDecision("refused", challenger_value=value, champion_version=None,
                                 champion_value=None, reason=reason, **common)
    try:
        champion = client.get_model_version_by_alias(name, rule.alias)
    except MlflowException:
        return PromotionDecision("promoted", challenger_value=value, champion_version=None,
                                 champion_value=None, reason=f"first evaluated version: no @{rule.alias} yet",
                                 **common)
    champion_value = _metric_of(champion.tags, rule.metric)
    assert value is not None
    if str(champion.version) == str(version):
        return PromotionDecision("kept", challenger_value=value, champion_version=str(champion.version),
                                 champion_value=champion_value, reason=f"already @{rule.alias}", **common)
    if champion_value is None or beats(value, champion_value, rule.margin, rule.greater_is_better):
        direction = "higher" if rule.greater_is_better else "lower"
        reason = (
            f"{rule.metric} {value:.6g} vs {champion_value} ({direction} is better, margin {rule.margin})"
        )
        outcome: Outcome = "promoted"
    else:
        reason = f"{rule.metric} {value:.6g} does not beat {champion_value:.6g} by more than {rule.margin}"
        outcome = "kept"
    return PromotionDecision(outcome, challenger_value=value, champion_version=str(champion.version),
                             champion_value=champion_value, reason=reason, **common)


def promote(cfg: Config, version: str) -> PromotionDecision:
    """Decide, record the decision as tags on the version, and move the alias when promoted."""
    decision = decide(cfg, str(version))
    client = use_tracking(cfg)
    name = cfg.tracking.registered_model
    for key, value in decision.as_tags().items():
        client.set_model_version_tag(name, str(version), key, value)
    if decision.promoted:
        client.set_registered_model_alias(name, decision.alias, str(version))
    return decision
