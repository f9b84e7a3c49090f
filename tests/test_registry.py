"""Registry on a real sqlite MLflow store: versions, provenance tags, gated promotion."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import save_file

from llama_adapter_v2.config import Config, load_config
from llama_adapter_v2.config.schema import GuardConfig, PromotionConfig
from llama_adapter_v2.registry import promote, register, with_baseline
from llama_adapter_v2.registry.promote import beats
from llama_adapter_v2.store import ensure_experiment, use_tracking


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Config:
    store = tmp_path_factory.mktemp("mlflow")
    return load_config(
        repo_root / "configs" / "demo.yaml",
        [f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_root={store}/artifacts",
         "tracking.registered_model=registry-test", "tracking.promotion.margin=0.125",
         "tracking.promotion.metric=caption_cider", "tracking.promotion.guards={}"],
    )


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A safetensors adapter file: promotion reads tags only, never the weights."""
    folder = tmp_path_factory.mktemp("adapter")
    save_file({"gate": torch.zeros(4)}, str(folder / "adapter.safetensors"))
    return folder


BASELINE = {"caption_cider": 0.125, "instruction_exact_match": 0.0}


def _new_version(cfg: Config, adapter_dir: Path, metrics: dict[str, float] | None,
                 baseline: dict[str, float] | None = BASELINE) -> str:
    with mlflow.start_run(experiment_id=ensure_experiment(cfg)) as run:  # stands in for a training run
        pass
    return register(cfg, run.info.run_id, adapter_dir, with_baseline(metrics, baseline)).version


def _champion(cfg: Config) -> str:
    client = use_tracking(cfg)
    return str(client.get_model_version_by_alias(cfg.tracking.registered_model, "champion").version)


def test_gate_is_strict_and_respects_direction() -> None:
    assert beats(0.75, 0.5, margin=0.125, greater_is_better=True)
    assert not beats(0.625, 0.5, margin=0.125, greater_is_better=True)  # equal to the margin: not better
    assert not beats(0.375, 0.5, margin=0.0, greater_is_better=True)
    assert beats(0.25, 0.5, margin=0.125, greater_is_better=False)
    assert not beats(0.50, 0.50, margin=0.0, greater_is_better=False)


def test_version_records_provenance_and_metrics(
    store_cfg: Config, adapter_dir: Path, repo_root: Path
) -> None:
    version = _new_version(store_cfg, adapter_dir, {"caption_cider": 0.25, "caption_bleu_4": 0.125})
    client = use_tracking(store_cfg)
    found = client.get_model_version(store_cfg.tracking.registered_model, version)
    assert found.tags["metric.caption_cider"] == "0.25"
    assert found.tags["metric.caption_bleu_4"] == "0.125"
    assert found.tags["evaluation"] == "passed"
    assert len(found.tags["git_commit"].removesuffix("-dirty")) == 40
    expected_hash = "untracked"
    if (repo_root / "data.dvc").is_file():
        expected_hash = (repo_root / "data.dvc").read_text().split("md5: ")[1].split()[0]
    assert found.tags["data_hash"] == expected_hash
    assert "config" not in found.tags  # the config travels in the model (model_config), not as a tag
    assert len(found.tags["config_digest"]) == 16
    assert found.tags["base_path"] == str(store_cfg.model.base.path)
    assert found.source.startswith("models:/m-")  # the logged pyfunc, not a bare artifact folder
    model_files = Path(mlflow.artifacts.download_artifacts(found.source,
                                                           dst_path=str(adapter_dir.parent / "model")))
    assert (model_files / "MLmodel").is_file()
    # never evaluated with tracking, so logged in no run, but in the project's experiment
    logged = client.get_logged_model(found.source.removeprefix("models:/"))
    assert logged.experiment_id == ensure_experiment(store_cfg)
    # one artifact rule for training, evaluation and the registry: <artifact_root>/<experiment>
    experiment = client.get_experiment_by_name(store_cfg.tracking.experiment)
    root = store_cfg.tracking.artifact_root
    assert root is not None
    assert experiment.artifact_location == (root / store_cfg.tracking.experiment).as_uri()


def test_promotion_gate_on_real_store(store_cfg: Config, adapter_dir: Path) -> None:
    first = _new_version(store_cfg, adapter_dir, {"caption_cider": 0.50})
    decision = promote(store_cfg, first)
    assert decision.outcome == "promoted"
    assert _champion(store_cfg) == first

    worse = _new_version(store_cfg, adapter_dir, {"caption_cider": 0.375})
    assert promote(store_cfg, worse).outcome == "kept"
    within_margin = _new_version(store_cfg, adapter_dir, {"caption_cider": 0.625})
    assert promote(store_cfg, within_margin).outcome == "kept"
    assert _champion(store_cfg) == first

    better = _new_version(store_cfg, adapter_dir, {"caption_cider": 0.75})
    decision = promote(store_cfg, better)
    assert decision.outcome == "promoted"
    numbers = (decision.champion_version, decision.champion_value, decision.challenger_value)
    assert numbers == (first, 0.5, 0.75)
    assert _champion(store_cfg) == better
    client = use_tracking(store_cfg)
    old = client.get_model_version(store_cfg.tracking.registered_model, first)
    assert old.tags["promotion.superseded_by"] == better
    assert client.get_model_version(store_cfg.tracking.registered_model, better).description.startswith(
        f"promoted: version {better} caption_cider 0.75 beats the zero-init baseline's 0.125 and "
        f"@champion version {first}'s 0.5 by more than 0.125"
    )
    tags_before = old.tags
    assert promote(store_cfg, better).outcome == "kept"  # asked again: the recorded decision stands
    assert client.get_model_version(store_cfg.tracking.registered_model, better).tags[
        "promotion.outcome"] == "promoted"
    assert client.get_model_version(store_cfg.tracking.registered_model, first).tags == tags_before

    tags = use_tracking(store_cfg).get_model_version(store_cfg.tracking.registered_model, worse).tags
    assert tags["promotion.outcome"] == "kept"
    assert tags["promotion.challenger_value"] == "0.375"
    assert tags["promotion.champion_value"] == "0.5"
    assert tags["promotion.champion_version"] == first
    assert tags["promotion.margin"] == "0.125"


def test_unevaluated_and_failed_versions_are_refused(store_cfg: Config, adapter_dir: Path) -> None:
    champion_before = _new_version(store_cfg, adapter_dir, {"caption_cider": 0.9})
    promote(store_cfg, champion_before)
    champion_before = _champion(store_cfg)
    unevaluated = _new_version(store_cfg, adapter_dir, None)
    failed = _new_version(store_cfg, adapter_dir, {"caption_cider": float("nan")})
    other_metric_only = _new_version(store_cfg, adapter_dir, {"caption_bleu_4": 99.0})
    for version, why in ((unevaluated, "evaluation is missing"), (failed, "evaluation is failed"),
                         (other_metric_only, "metric caption_cider is None")):
        decision = promote(store_cfg, version)
        assert decision.outcome == "refused"
        assert decision.reason.startswith(why)
        tags = use_tracking(store_cfg).get_model_version(store_cfg.tracking.registered_model, version).tags
        assert tags["promotion.outcome"] == "refused"
    assert _champion(store_cfg) == champion_before


def _gated(cfg: Config, name: str, **promotion: object) -> Config:
    """The store's config with another registered model and promotion rule: a registry of its own."""
    tracking = cfg.tracking.model_copy(update={
        "registered_model": f"registry-test-{name}",
        # validated as a config file's would be (model_copy alone does not validate)
        "promotion": PromotionConfig.model_validate({**cfg.tracking.promotion.model_dump(), **promotion}),
    })
    return cfg.model_copy(update={"tracking": tracking})


def test_a_version_that_does_not_beat_the_zero_init_baseline_is_refused_even_first(
    store_cfg: Config, adapter_dir: Path
) -> None:
    cfg = _gated(store_cfg, "baseline", margin=0.0)
    worse_than_nothing = _new_version(cfg, adapter_dir, {"caption_cider": 0.231}, {"caption_cider": 0.278})
    decision = promote(cfg, worse_than_nothing)
    assert decision.outcome == "refused"
    assert decision.baseline_value == 0.278
    assert decision.reason == (f"version {worse_than_nothing} caption_cider 0.231 does not beat the "
                               "zero-init baseline's 0.278 by more than 0")
    no_baseline = _new_version(cfg, adapter_dir, {"caption_cider": 0.9}, None)
    decision = promote(cfg, no_baseline)
    assert decision.outcome == "refused"
    assert decision.reason.startswith("no zero-init baseline for caption_cider")
    better = _new_version(cfg, adapter_dir, {"caption_cider": 0.3},
                          {"caption_cider": 0.278, "caption_meteor": 0.1})  # METEOR: not the gate's
    decision = promote(cfg, better)
    assert decision.outcome == "promoted"
    assert decision.reason == (f"version {better} caption_cider 0.3 beats the zero-init baseline's 0.278 by "
                               "more than 0 (higher is better); no @champion yet")
    tags = use_tracking(cfg).get_model_version(cfg.tracking.registered_model, better).tags
    assert tags["promotion.baseline_value"] == "0.278"
    assert tags["metric.baseline_caption_cider"] == "0.278"
    baseline_tags = [key for key in tags if key.startswith("metric.baseline_")]
    assert baseline_tags == ["metric.baseline_caption_cider"]  # of the baseline, only what the gate reads
    assert tags["evaluation"] == "passed"


def test_a_guard_metric_that_falls_too_far_keeps_the_champion(store_cfg: Config, adapter_dir: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    cfg = _gated(store_cfg, "guards", margin=0.0, guards={"instruction_exact_match": 0.05})
    champion = _new_version(cfg, adapter_dir, {"caption_cider": 0.5, "instruction_exact_match": 0.25})
    assert promote(cfg, champion).outcome == "promoted"
    forgets = _new_version(cfg, adapter_dir, {"caption_cider": 0.75, "instruction_exact_match": 0.125})
    decision = promote(cfg, forgets)
    assert decision.outcome == "kept"
    assert decision.reason == (f"version {forgets} caption_cider 0.75 beats the gate, but guard "
                               "instruction_exact_match 0.125 fell 0.125 below "
                               f"@champion version {champion}'s 0.25 (tolerance 0.05)")
    within = _new_version(cfg, adapter_dir, {"caption_cider": 0.75, "instruction_exact_match": 0.21875})
    decision = promote(cfg, within)
    assert decision.outcome == "promoted"
    assert decision.reason == (f"version {within} caption_cider 0.75 beats the zero-init baseline's 0.125 "
                               f"and @champion version {champion}'s 0.5 by more than 0 (higher is better); "
                               "guards held: instruction_exact_match")
    assert _champion(cfg) == within
    with caplog.at_level(logging.WARNING, logger="llama_adapter_v2.registry.register"):
        unguarded = _new_version(cfg, adapter_dir, {"caption_cider": 0.875})
    assert "the evaluation recorded no instruction_exact_match" in caplog.text
    decision = promote(cfg, unguarded)
    assert decision.outcome == "kept"
    assert decision.reason.endswith("guard instruction_exact_match is None")


def test_a_lower_is_better_guard_holds_against_a_rise_and_a_bare_tolerance_stays_higher_is_better(
    store_cfg: Config, adapter_dir: Path
) -> None:
    guards = {"instruction_exact_match": 0.05,
              "instruction_loss": {"tolerance": 0.25, "greater_is_better": False}}
    cfg = _gated(store_cfg, "loss-guard", margin=0.0, guards=guards)
    assert cfg.tracking.promotion.guards == {
        "instruction_exact_match": GuardConfig(tolerance=0.05, greater_is_better=True),
        "instruction_loss": GuardConfig(tolerance=0.25, greater_is_better=False)}
    champion = _new_version(cfg, adapter_dir, {"caption_cider": 0.5, "instruction_exact_match": 0.25,
                                               "instruction_loss": 2.0})
    assert promote(cfg, champion).outcome == "promoted"
    # a lower loss is no fall, however far it goes: only a rise is held against the guard
    better_loss = _new_version(cfg, adapter_dir, {"caption_cider": 0.625, "instruction_exact_match": 0.25,
                                                  "instruction_loss": 1.0})
    decision = promote(cfg, better_loss)
    assert decision.outcome == "promoted", decision.reason
    assert decision.reason.endswith("guards held: instruction_exact_match, instruction_loss")
    worse_loss = _new_version(cfg, adapter_dir, {"caption_cider": 0.75, "instruction_exact_match": 0.25,
                                                 "instruction_loss": 1.5})
    decision = promote(cfg, worse_loss)
    assert decision.outcome == "kept"
    assert decision.reason == (f"version {worse_loss} caption_cider 0.75 beats the gate, but guard "
                               "instruction_loss 1.5 rose 0.5 above "
                               f"@champion version {better_loss}'s 1 (tolerance 0.25; lower is better)")
    within = _new_version(cfg, adapter_dir, {"caption_cider": 0.75, "instruction_exact_match": 0.25,
                                             "instruction_loss": 1.25})
    assert promote(cfg, within).outcome == "promoted"  # rose exactly the tolerance: held
    assert _champion(cfg) == within
    tags = use_tracking(cfg).get_model_version(cfg.tracking.registered_model, worse_loss).tags
    assert tags["promotion.outcome"] == "kept"


def test_a_failed_evaluation_names_the_metric_that_is_not_finite(
    store_cfg: Config, adapter_dir: Path
) -> None:
    cfg = _gated(store_cfg, "failed")
    failed = _new_version(cfg, adapter_dir, {"caption_cider": 0.5, "caption_meteor": float("nan")})
    decision = promote(cfg, failed)
    assert decision.outcome == "refused"
    assert decision.reason.startswith("evaluation is failed (caption_meteor not finite)")


def test_an_unscored_champion_is_replaced_and_a_guard_it_lacks_is_held_against_the_baseline(
    store_cfg: Config, adapter_dir: Path
) -> None:
    cfg = _gated(store_cfg, "unscored", margin=0.0, guards={"instruction_exact_match": 0.05})
    broken = _new_version(cfg, adapter_dir, {"caption_cider": 0.5}, {"caption_cider": 0.125})
    use_tracking(cfg).set_registered_model_alias(cfg.tracking.registered_model, "champion", broken)
    use_tracking(cfg).set_model_version_tag(cfg.tracking.registered_model, broken,
                                            "metric.caption_cider", "nan")
    forgets = _new_version(cfg, adapter_dir, {"caption_cider": 0.25, "instruction_exact_match": 0.0},
                           {"caption_cider": 0.125, "instruction_exact_match": 0.25})
    decision = promote(cfg, forgets)  # the champion has no such guard: the baseline's 0.25 is the bar
    assert decision.outcome == "kept"
    assert decision.reason.endswith("guard instruction_exact_match 0 fell 0.25 below the zero-init "
                                    "baseline's 0.25 (tolerance 0.05)")
    better = _new_version(cfg, adapter_dir, {"caption_cider": 0.25, "instruction_exact_match": 0.25},
                          {"caption_cider": 0.125, "instruction_exact_match": 0.25})
    decision = promote(cfg, better)
    assert decision.outcome == "promoted"
    assert f"@champion version {broken} has no finite caption_cider to compare" in decision.reason
