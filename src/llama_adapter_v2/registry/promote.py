"""Gated promotion: the alias moves only to an evaluated version that beats the zero-init baseline
and the champion, with no guard metric fallen too far.

The baseline is the frozen base with the adapter at its identity (``lav2 evaluate --zero-init``):
a trained adapter that does not beat doing nothing must never become the champion, even the
first. Every decision (promoted, kept, refused) is written as tags on the challenger version with
the versions and rounded numbers it compared, so the registry itself explains why an alias
points where it does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from mlflow.exceptions import MlflowException

from llama_adapter_v2.config import Config
from llama_adapter_v2.config.schema import PromotionConfig
from llama_adapter_v2.registry.register import BASELINE_PREFIX, METRIC_TAG_PREFIX, TAG_EVALUATION
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
    baseline_value: float | None = None

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    def as_tags(self) -> dict[str, str]:
        return {
            "promotion.outcome": self.outcome,
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.challenger_value": repr(self.challenger_value),
            "promotion.baseline_value": repr(self.baseline_value),
            "promotion.champion_version": str(self.champion_version),
            "promotion.champion_value": repr(self.champion_value),
            "promotion.margin": repr(self.margin),
            "promotion.decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def _metric_of(tags: dict[str, str], metric: str) -> float | None:
    raw = tags.get(f"{METRIC_TAG_PREFIX}{metric}")
    return None if raw is None else float(raw)


def gain(value: float, reference: float, greater_is_better: bool) -> float:
    """How much better ``value`` is than ``reference`` in the metric's direction (negative: worse)."""
    return value - reference if greater_is_better else reference - value


def beats(challenger: float, champion: float, margin: float, greater_is_better: bool) -> bool:
    """Strictly better by more than ``margin`` in the configured direction."""
    return gain(challenger, champion, greater_is_better) > margin


def _refusal(tags: dict[str, str], status: str, rule: PromotionConfig) -> str | None:
    if status != "READY":
        return f"version status is {status}, not READY"
    evaluation = tags.get(TAG_EVALUATION, "missing")
    if evaluation != "passed":
        bad = sorted(key.removeprefix(METRIC_TAG_PREFIX) for key, raw in tags.items()
                     if key.startswith(METRIC_TAG_PREFIX) and not math.isfinite(float(raw)))
        which = f" ({', '.join(bad)} not finite)" if bad else ""
        return f"evaluation is {evaluation}{which}: only evaluated versions can be promoted"
    value = _metric_of(tags, rule.metric)
    if value is None or not math.isfinite(value):
        return f"metric {rule.metric} is {value}: unevaluated on the promotion metric"
    baseline = _metric_of(tags, BASELINE_PREFIX + rule.metric)
    if rule.beat_baseline and (baseline is None or not math.isfinite(baseline)):
        return (f"no zero-init baseline for {rule.metric} ({BASELINE_PREFIX}{rule.metric} is {baseline}): "
                "register with --baseline <metrics of lav2 evaluate --zero-init>")
    return None


def _champion(client: Any, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _fallen_guards(rule: PromotionConfig, tags: dict[str, str], reference: dict[str, str],
                   reference_name: str, prefix: str) -> list[str]:
    """The guard metrics that worsened against the reference by more than their tolerance (fell, or
    rose for a lower-is-better guard), as sentences. A guard the reference never scored is held
    against the challenger's own baseline instead."""
    fallen = []
    for metric, guard in sorted(rule.guards.items()):
        value = _metric_of(tags, metric)
        name, before = reference_name, _metric_of(reference, prefix + metric)
        if before is None:
            name, before = "the zero-init baseline", _metric_of(tags, BASELINE_PREFIX + metric)
        if value is None or not math.isfinite(value):
            fallen.append(f"guard {metric} is {value}")
            continue
        if before is None:
            continue
        worse = -gain(value, before, guard.greater_is_better)
        if worse > guard.tolerance:
            moved, side, lower = (("fell", "below", "") if guard.greater_is_better
                                  else ("rose", "above", "; lower is better"))
            fallen.append(f"guard {metric} {value:.4g} {moved} {worse:.4g} {side} {name}'s "
                          f"{before:.4g} (tolerance {guard.tolerance:g}{lower})")
    return fallen


def decide(cfg: Config, version: str) -> PromotionDecision:
    """Compare ``version`` with its baseline and the current alias holder; changes nothing."""
    rule = cfg.tracking.promotion
    client = use_tracking(cfg)
    name = cfg.tracking.registered_model
    challenger = client.get_model_version(name, version)
    value = _metric_of(challenger.tags, rule.metric)
    baseline = _metric_of(challenger.tags, BASELINE_PREFIX + rule.metric)
    common: dict[str, Any] = {"version": str(version), "alias": rule.alias, "metric": rule.metric,
                              "margin": rule.margin, "challenger_value": value, "baseline_value": baseline}
    if reason := _refusal(challenger.tags, challenger.status, rule):
        return PromotionDecision("refused", champion_version=None, champion_value=None, reason=reason,
                                 **common)
    assert value is not None
    champion = _champion(client, name, rule.alias)
    common["champion_version"] = None if champion is None else str(champion.version)
    common["champion_value"] = None if champion is None else _metric_of(champion.tags, rule.metric)
    if common["champion_value"] is not None and not math.isfinite(common["champion_value"]):
        common["champion_value"] = None  # a NaN champion could never be beaten; it counts as unscored
    return _judge(rule, challenger.tags, champion, common)


def _judge(rule: PromotionConfig, tags: dict[str, str], champion: Any | None,
           common: dict[str, Any]) -> PromotionDecision:
    """The gate's order: baseline, then champion, then guards; the first failure decides."""
    version, value, baseline = common["version"], common["challenger_value"], common["baseline_value"]
    champion_version, champion_value = common["champion_version"], common["champion_value"]
    head = f"version {version} {rule.metric} {value:.4g}"
    if champion_version == version:
        return PromotionDecision("kept", reason=f"already @{rule.alias}", **common)
    if rule.beat_baseline and baseline is not None and not beats(value, baseline, rule.margin,
                                                                 rule.greater_is_better):
        return PromotionDecision("refused", reason=f"{head} does not beat the zero-init baseline's "
                                 f"{baseline:.4g} by more than {rule.margin:g}", **common)
    champion_name = f"@{rule.alias} version {champion_version}"
    if champion_value is not None and not beats(value, champion_value, rule.margin, rule.greater_is_better):
        return PromotionDecision("kept", reason=f"{head} does not beat {champion_name}'s "
                                 f"{champion_value:.4g} by more than {rule.margin:g}", **common)
    if champion is not None:
        fallen = _fallen_guards(rule, tags, champion.tags, champion_name, "")
    else:
        fallen = _fallen_guards(rule, tags, tags, "the zero-init baseline", BASELINE_PREFIX)
    if fallen:
        outcome: Outcome = "kept" if champion is not None else "refused"
        return PromotionDecision(outcome, reason=f"{head} beats the gate, but " + "; ".join(fallen), **common)
    gated_by_baseline = rule.beat_baseline and baseline is not None
    beaten = [f"the zero-init baseline's {baseline:.4g}"] if gated_by_baseline else []
    beaten += [] if champion_value is None else [f"{champion_name}'s {champion_value:.4g}"]
    unscored = "" if champion is None or champion_value is not None else (
        f"; {champion_name} has no finite {rule.metric} to compare")
    direction = "higher" if rule.greater_is_better else "lower"
    against = " and ".join(beaten) if beaten else "nothing to compare"
    first = "" if champion is not None else f"; no @{rule.alias} yet"
    guards = f"; guards held: {', '.join(sorted(rule.guards))}" if rule.guards else ""
    reason = (f"{head} beats {against} by more than {rule.margin:g} ({direction} is better)"
              f"{first}{unscored}{guards}")
    return PromotionDecision("promoted", reason=reason, **common)


def promote(cfg: Config, version: str) -> PromotionDecision:
    """Decide, record the decision as tags on the version, and move the alias when promoted."""
    decision = decide(cfg, str(version))
    if decision.outcome == "kept" and decision.champion_version == decision.version:
        return decision  # the champion asked again (a re-run pipeline): its recorded decision stands
    client = use_tracking(cfg)
    name = cfg.tracking.registered_model
    for key, value in decision.as_tags().items():
        client.set_model_version_tag(name, str(version), key, value)
    tags = client.get_model_version(name, str(version)).tags
    client.update_model_version(name, str(version), description=(
        f"{decision.outcome}: {decision.reason}. Data {tags.get('data_hash', '?')[:12]}, "
        f"commit {tags.get('git_commit', '?')[:12]}."
    ))
    if decision.promoted:
        client.set_registered_model_alias(name, decision.alias, str(version))
        if decision.champion_version is not None:  # the old champion's own "promoted" is history now
            client.set_model_version_tag(name, decision.champion_version, "promotion.superseded_by",
                                         str(version))
    return decision
