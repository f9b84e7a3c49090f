"""The three data stages behind ``lav2 data prepare|validate|shard`` and ``dvc.yaml``.

prepare  reads every configured source into one normalised JSONL per kind (problems noted);
validate runs the GX suites, writes the clean records, the quarantine, the summary and GX's Data Docs;
shard    splits the clean records into train/holdout webdataset shards.
Paths inside the written files are relative to the project root, so outputs do not depend on
where the clone lives.

Nothing goes unreported: every input record ends clean or quarantined (counted, and checked:
``RecordCountError``), and what is not a record at all is listed by id in the summary, the Data
Docs and the metrics: listed images no caption uses, captions whose image is not listed (also
quarantined), and exact duplicates (also quarantined, the first copy kept).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

from llama_adapter_v2.config.schema import Config
from llama_adapter_v2.data.paths import DataPaths
from llama_adapter_v2.data.readers import RawRecord, read_coco_listing, read_instructions
from llama_adapter_v2.data.records import Kind, Record
from llama_adapter_v2.data.shards import write_shards
from llama_adapter_v2.data.validation import (
    RecordCountError,
    TokenCounter,
    ValidationStoppedError,
    build_data_docs,
    caption_rows,
    failures_of,
    instruction_rows,
    run_suite,
)

KINDS: tuple[Kind, ...] = ("caption", "instruction")
SUITE_OF: dict[Kind, str] = {"caption": "captions", "instruction": "instructions"}
ORPHAN_RULE = "annotation points at a listed image"
DUPLICATE_RULE = "not an exact duplicate"


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(item, sort_keys=True) for item in items)  # ASCII escapes: lone surrogates survive
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run the earlier data stage first)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _relative(path: str | None, root: Path) -> str | None:
    """``path`` relative to the project root when it lies under it, by its text alone: nothing is
    resolved (data paths are checked against their own roots, at validation), and ``..`` is kept."""
    if path is None or not PurePath(path).is_absolute():
        return path
    try:
        return str(PurePath(path).relative_to(root))
    except ValueError:
        return path


def _rooted(path: str | None, root: Path) -> str | None:
    return str(root / path) if path is not None and not PurePath(path).is_absolute() else path


def raw_from_dict(data: dict[str, Any]) -> RawRecord:
    return RawRecord(**{**data, "turns": [(role, text) for role, text in data["turns"]]})


def rooted(raw: RawRecord, root: Path) -> RawRecord:
    """The record with its image path and image root made absolute again against the project root."""
    raw.image, raw.image_root = _rooted(raw.image, root), _rooted(raw.image_root, root)
    return raw


# --------------------------------------------------------------------------- prepare


def prepare(cfg: Config, root: Path) -> dict[str, int]:
    """Read all sources; write ``prepared/{captions,instructions}.jsonl`` and the ids of listed
    images without captions (``prepared/images-without-captions.json``). Unreadable files raise."""
    paths = DataPaths(cfg.data.work_dir)
    listings = [(source.name, read_coco_listing(source)) for source in cfg.data.captions]
    raws: dict[Kind, list[RawRecord]] = {
        "caption": [r for _, listing in listings for r in listing.records],
        "instruction": [r for source in cfg.data.instructions for r in read_instructions(source)],
    }
    for kind, records in raws.items():
        for raw in records:
            raw.image, raw.image_root = _relative(raw.image, root), _relative(raw.image_root, root)
            raw.file = _relative(raw.file, root) or raw.file
        write_jsonl(paths.jsonl(paths.prepared, kind), [asdict(r) for r in records])
    uncaptioned = [f"{name}:{image_id}" for name, listing in listings
                   for image_id in listing.images_without_captions]
    paths.images_without_captions.write_text(json.dumps(uncaptioned, indent=1) + "\n", encoding="utf-8")
    return {kind: len(records) for kind, records in raws.items()}


# --------------------------------------------------------------------------- validate


def suite_parameters(cfg: Config) -> dict[str, Any]:
    limits = cfg.data.validation
    return {
        "image_min_side": limits.image_min_side, "image_max_side": limits.image_max_side,
        "caption_min_chars": limits.caption_min_chars, "caption_max_chars": limits.caption_max_chars,
        "max_tokens": limits.max_tokens,
    }


def validate_kind(kind: Kind, raws: list[RawRecord], cfg: Config, counter: Any) -> dict[str, Any]:
    """GX over one kind: clean records, quarantine entries, failures and the raw GX result."""
    if not raws:
        return {"clean": [], "quarantine": [], "failures": [], "gx": None}
    limits = cfg.data.validation
    rows = caption_rows(raws, limits) if kind == "caption" else instruction_rows(raws, limits, counter)
    result = run_suite(SUITE_OF[kind], rows, suite_parameters(cfg))
    failures = failures_of(result, rows)
    rules_by_row: dict[int, list[dict[str, Any]]] = {}
    for failure in failures:
        broken = {"rule": failure["rule"], "value": failure["value"]}
        rules_by_row.setdefault(failure["row"], []).append(broken)
    clean = [raws[i].to_record() for i in range(len(raws)) if i not in rules_by_row]
    quarantine = [
        {"id": raws[i].id, "source": raws[i].source, "file": raws[i].file, "index": raws[i].index,
         "rules": rules, "record": asdict(raws[i])}
        for i, rules in sorted(rules_by_row.items())
    ]
    return {"clean": clean, "quarantine": quarantine, "failures": failures, "gx": result}


def validate(cfg: Config, root: Path, data_version: str | None = None) -> dict[str, Any]:
    """Validate the prepared records; write clean, quarantine, summary, Data Docs and metrics.

    ``data_version`` (the DVC hash of the data, from the caller: the data layer does not read DVC
    files) is shown in the Data Docs beside the hash of the prepared records they judge.
    Raises ``ValidationStoppedError`` (after writing the reports) when a kind's failure fraction is
    above ``data.validation.max_failure_fraction``, or on any failure with ``on_failure: stop``.
    """
    paths = DataPaths(cfg.data.work_dir)
    limits = cfg.data.validation
    counter = TokenCounter(limits.tokenizer)
    validated_at = datetime.now(UTC)
    data_docs = _relative(str(paths.data_docs / "index.html"), root)
    summary: dict[str, Any] = {"token_counter": counter.description, "data_docs": data_docs,
                               "data_version": data_version, "validated_at": validated_at.isoformat()}
    outcomes = {}
    for kind in KINDS:
        raws = [rooted(raw_from_dict(d), root) for d in read_jsonl(paths.jsonl(paths.prepared, kind))]
        outcome = validate_kind(kind, raws, cfg, counter)
        outcomes[kind] = outcome
        clean = [replace(r, image=_relative(r.image, root)).to_dict() for r in outcome["clean"]]
        write_jsonl(paths.jsonl(paths.validated, kind), clean)
        for entry in outcome["quarantine"]:
            record = entry["record"]
            record["image"], record["image_root"] = _relative(record["image"], root), _relative(
                record["image_root"], root)
        write_jsonl(paths.jsonl(paths.quarantine, kind), outcome["quarantine"])
        summary[kind] = kind_summary(len(raws), outcome)
        summary[kind]["prepared_sha256"] = _sha256(paths.jsonl(paths.prepared, kind))
    summary["caption"]["images_without_captions"] = listed(_read_json_list(paths.images_without_captions))
    paths.reports.mkdir(parents=True, exist_ok=True)
    summary_path = paths.reports / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    build_data_docs({SUITE_OF[kind]: outcome["gx"] for kind, outcome in outcomes.items() if outcome["gx"]},
                    paths.data_docs, run_name=f"data-{(data_version or 'untracked')[:12]}",
                    validated_at=validated_at, markers=docs_markers(summary, paths))
    metrics_text = json.dumps(validation_metrics(summary), indent=2, sort_keys=True) + "\n"
    paths.validation_metrics.write_text(metrics_text, encoding="utf-8")
    for kind in KINDS:
        counts = summary[kind]
        too_many = counts["failure_fraction"] > limits.max_failure_fraction
        if too_many or (limits.on_failure == "stop" and counts["quarantined"]):
            why = (f"above max_failure_fraction {limits.max_failure_fraction:.2%}" if too_many
                   else "on_failure is 'stop'")
            raise ValidationStoppedError(
                f"{kind} validation stopped: {counts['quarantined']} of {counts['input']} records failed "
                f"({counts['failure_fraction']:.2%}, {why}); clean {counts['clean']}, quarantined "
                f"{counts['quarantined']} in {paths.jsonl(paths.quarantine, kind)}; "
                f"Data Docs: {data_docs}, summary: {summary_path}"
            )
    return summary


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


MAX_LISTED_IDS = 20


def docs_markers(summary: dict[str, Any], paths: DataPaths) -> dict[str, dict[str, str]]:
    """What each suite's Data Docs page shows beside GX's own batch markers: which data, how many
    records went where, and what is no record at all (listed by id, the first ``MAX_LISTED_IDS``)."""
    markers = {}
    for kind in KINDS:
        counts = summary[kind]
        markers[SUITE_OF[kind]] = {
            "data_dvc_md5": summary["data_version"] or "not given",
            "prepared_sha256": counts["prepared_sha256"],
            "validated_at": summary["validated_at"],
            "records": f"{counts['input']} in, {counts['clean']} clean, {counts['quarantined']} quarantined "
                       f"(in {paths.jsonl(paths.quarantine, kind).name})",
        }
        for key in LISTS[kind]:
            ids = [e if isinstance(e, str) else f"{e['id']} (duplicate of {e['duplicate_of']})"
                   for e in counts[key]["ids"]]
            more = f" and {len(ids) - MAX_LISTED_IDS} more" if len(ids) > MAX_LISTED_IDS else ""
            shown = ", ".join(ids[:MAX_LISTED_IDS]) or "none"
            markers[SUITE_OF[kind]][key] = f"{len(ids)}: {shown}{more}"
    return markers


def _read_json_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run the earlier data stage first)")
    return list(json.loads(path.read_text(encoding="utf-8")))


def listed(ids: list[Any]) -> dict[str, Any]:
    """What the report lists by id: the count and the ids."""
    return {"count": len(ids), "ids": ids}


def kind_summary(total: int, outcome: dict[str, Any]) -> dict[str, Any]:
    """Counts, failures by rule, and the lists by id; raises ``RecordCountError`` if a record is lost."""
    clean, quarantined = len(outcome["clean"]), len(outcome["quarantine"])
    if clean + quarantined != total:
        raise RecordCountError(f"lost records: {total} in, {clean} clean + {quarantined} quarantined")
    failures = outcome["failures"]
    return {
        "input": total, "clean": clean, "quarantined": quarantined,
        "failure_fraction": round(quarantined / total, 6) if total else 0.0,
        "by_rule": dict(sorted(Counter(f["rule"] for f in failures).items())),
        "failures": [{"id": f["id"], "rule": f["rule"], "value": f["value"]} for f in failures],
        "orphan_captions": listed([f["id"] for f in failures if f["rule"] == ORPHAN_RULE]),
        "duplicates": listed([{"id": f["id"], "duplicate_of": f["value"]}
                              for f in failures if f["rule"] == DUPLICATE_RULE]),
    }


LISTS: dict[Kind, tuple[str, ...]] = {
    "caption": ("images_without_captions", "orphan_captions", "duplicates"),
    "instruction": ("duplicates",),
}


COUNTS = ("input", "clean", "quarantined", "failure_fraction")


def validation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``validation-metrics.json`` (DVC metrics), flat and named like the other stages' metrics: per
    kind the counts (``caption_quarantined``), the listed counts (``caption_orphan_captions``) and the
    failures by rule (``instruction_rule_not_an_exact_duplicate``); the rules that failed nothing are
    absent."""
    metrics: dict[str, float] = {}
    for kind in KINDS:
        counts = summary[kind]
        metrics |= {f"{kind}_{key}": counts[key] for key in COUNTS}
        metrics |= {f"{kind}_{key}": counts[key]["count"] for key in LISTS[kind]}
        metrics |= {f"{kind}_rule_{metric_name(rule)}": count for rule, count in counts["by_rule"].items()}
    return dict(sorted(metrics.items()))


def metric_name(rule: str) -> str:
    """A rule as a metric name: lower case, every other character than a letter or digit ``_``."""
    return "".join(ch if ch.isalnum() else "_" for ch in rule.lower())


# --------------------------------------------------------------------------- shard


def shard(cfg: Config, root: Path) -> dict[str, dict[str, int]]:
    """Write ``shards/{caption,instruction}/{train,holdout}`` from the validated records."""
    paths = DataPaths(cfg.data.work_dir)
    counts: dict[str, dict[str, int]] = {}
    for kind in KINDS:
        records = []
        for data in read_jsonl(paths.jsonl(paths.validated, kind)):
            record = Record.from_dict(data)
            if record.image is not None and not Path(record.image).is_absolute():
                record = replace(record, image=str(root / record.image))
            records.append(record)
        indexes = write_shards(records, paths.shards / kind, kind=kind,
                               samples_per_shard=cfg.data.shards.samples_per_shard,
                               holdout_fraction=cfg.data.holdout_fraction)
        counts[kind] = {split: index.count for split, index in indexes.items()}
    paths.shard_metrics.write_text(json.dumps(shard_metrics(counts), indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    return counts


def shard_metrics(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """``shard-metrics.json`` (DVC metrics), flat like the other stages': ``caption_train_samples``."""
    return {f"{kind}_{split}_samples": n for kind, splits in counts.items() for split, n in splits.items()}
