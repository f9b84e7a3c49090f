"""Great Expectations validation with quarantine: clean records go on, failing ones are kept aside.

Python does what GX cannot see (resolving image paths against their root, decoding images,
counting tokens, finding control characters, fingerprinting duplicates) and puts the facts in
columns; the suites in ``data/suites/*.json`` judge those columns, with thresholds from
``data.validation`` as suite parameters. Every failing row is named by id and rule
(``result_format=COMPLETE`` with the id as index column). Input count = clean + quarantined,
always: a record is either clean or in the quarantine file with every rule it broke.

An image is opened only after its path, resolved with symlinks, is found inside its source's root
(``data.containment``); each way an image can fail has its own status and rule (``IMAGE_RULES``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.core import ExpectationSuiteValidationResult
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.data_context.types.resource_identifiers import (
    ExpectationSuiteIdentifier,
    ValidationResultIdentifier,
)
from PIL import Image, UnidentifiedImageError
from transformers import AutoTokenizer

from llama_adapter_v2.config.schema import ValidationConfig
from llama_adapter_v2.data.containment import OutsideRootError, resolve_inside, usable_path_text
from llama_adapter_v2.data.formatting import encode_record, segments
from llama_adapter_v2.data.readers import RawRecord

SUITES = Path(__file__).with_name("suites")
ID_COLUMNS = ["row", "id"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# C0 controls but tab and newline, and DEL: never meant in a caption or an instruction, and a NUL
# ends strings in C tokenizers. Lone surrogates (not UTF-8 at all) have their own rule.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
LONE_SURROGATES = re.compile("[\ud800-\udfff]")
# image_status -> the rule (as named in both suites) a record with that status breaks.
IMAGE_RULES: dict[str, str] = {
    "outside root": "image inside its source root",
    "missing file": "image file exists",
    "empty file": "image file not empty",
    "not an image": "image file is an image",
    "over pixel limit": "image within the pixel limit",
    "truncated": "image file complete",
    "corrupt": "image decodes and converts to RGB",
}
IMAGE_OK = "ok"
IMAGE_DETAIL_CHARS = 1000  # room for the three paths of an escape (name, where it leads, the root)


class ValidationStoppedError(RuntimeError):
    """Too many records failed (or any, with ``on_failure: stop``); the message names counts and report."""


class RecordCountError(RuntimeError):
    """Input records != clean + quarantined: validation lost or invented a record (a bug, never data)."""


@dataclass(frozen=True)
class ImageCheck:
    status: str
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    detail: str | None = None


def inspect_image(path: str | Path, max_pixels: int) -> ImageCheck:
    """Open, bound-check (from the header, before decoding), decode and convert to RGB.

    ``path`` must already be known to lie inside its root (``check_image`` makes sure).
    """
    file = Path(path)
    if not file.is_file():  # also a FIFO or device: never opened (a FIFO would block)
        return ImageCheck("missing file")
    if file.stat().st_size == 0:
        return ImageCheck("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return ImageCheck("over pixel limit", detail=f"header says {width}x{height}, "
                                      f"above data.validation.max_image_pixels={max_pixels}")
                image.load()
                image.convert("RGB")
                return ImageCheck(IMAGE_OK, width, height, image.mode)
    except Image.DecompressionBombError as err:
        return ImageCheck("over pixel limit", detail=str(err))
    except UnidentifiedImageError:
        return ImageCheck("not an image")
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        truncated = "truncated" in str(err).lower() or isinstance(err, EOFError)
        return ImageCheck("truncated" if truncated else "corrupt", detail=str(err) or type(err).__name__)


def check_image(image: str, root: str | None, max_pixels: int) -> ImageCheck | None:
    """The image of a record, opened only if it resolves inside ``root``; None when the path text
    itself is unusable (a NUL byte, a lone surrogate: the text rules quarantine those)."""
    if not usable_path_text(image):
        return None
    if root is None or not usable_path_text(root):
        return ImageCheck("outside root", detail=f"{image}: its source has no usable root to lie in")
    try:
        resolved = resolve_inside(root, image)
    except OutsideRootError as err:
        return ImageCheck("outside root", detail=str(err))
    return inspect_image(resolved, max_pixels)


# --------------------------------------------------------------------------- token counting


class TokenCounter:
    """Tokens per record with a real tokenizer, or UTF-8 bytes + 2 (BOS/EOS) as an upper bound."""

    def __init__(self, tokenizer_dir: Path | None):
        self.tokenizer = None
        self.description = "utf-8 bytes + 2 (upper bound; data.validation.tokenizer not set)"
        if tokenizer_dir is not None:
            if not any((Path(tokenizer_dir) / name).is_file() for name in TOKENIZER_FILES):
                raise FileNotFoundError(f"data.validation.tokenizer: {tokenizer_dir} holds no tokenizer")

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            self.description = f"tokenizer at {tokenizer_dir}"

    def count(self, raw: RawRecord) -> int | None:
        if not _complete(raw):
            return None
        record = raw.to_record()
        if self.tokenizer is None:
            return len("".join(text for text, _ in segments(record)).encode("utf-8", "replace")) + 2
        return len(encode_record(record, self.tokenizer, 10**9)[0])


def _complete(raw: RawRecord) -> bool:
    return not raw.problems and all(isinstance(text, str) for _, text in raw.turns)


def text_fields(raw: RawRecord) -> dict[str, str]:
    """Every text of a record a person or a model will read, by name: turns, input, image path, id."""
    fields = {f"turn {i}": text for i, (_, text) in enumerate(raw.turns) if isinstance(text, str)}
    fields |= {"input": raw.input or "", "image": raw.image or "", "id": raw.id}
    return fields


def _valid_utf8(raw: RawRecord) -> bool:
    """JSON escapes can smuggle lone surrogates (\\ud800) that no UTF-8 file can hold."""
    return not any(LONE_SURROGATES.search(text) for text in text_fields(raw).values())


def control_characters(raw: RawRecord) -> str | None:
    """The first control character (C0 but tab and newline, DEL) of each text field that has one."""
    found = []
    for name, text in text_fields(raw).items():
        if match := CONTROL_CHARACTERS.search(text):
            found.append(f"U+{ord(match.group()):04X} in {name} at {match.start()}")
    return "; ".join(found) or None


# --------------------------------------------------------------------------- tables


ImageKey = tuple[str, str | None]


def inspect_images(raws: list[RawRecord], limits: ValidationConfig) -> dict[ImageKey, ImageCheck | None]:
    """Each distinct (image, root) once (five captions share one image)."""
    keys = sorted({(r.image, r.image_root) for r in raws if r.image}, key=lambda k: (k[0], k[1] or ""))
    return {key: check_image(key[0], key[1], limits.max_image_pixels) for key in keys}


def _image_columns(raw: RawRecord, checks: dict[ImageKey, ImageCheck | None]) -> dict[str, Any]:
    check = checks.get((raw.image, raw.image_root)) if raw.image else None
    ok = check is not None and check.status == IMAGE_OK
    return {"image_status": check.status if check else None, "image_detail": check.detail if check else None,
            "image_width": check.width if ok else None, "image_height": check.height if ok else None}


def _duplicate_of(raw: RawRecord, first_seen: dict[str, str]) -> str | None:
    """The id of the first record with exactly this content; records missing a text are not compared."""
    if raw.turns_without_text:
        return None
    first = first_seen.setdefault(_fingerprint(raw), raw.id)
    return None if first == raw.id else first


def caption_rows(raws: list[RawRecord], limits: ValidationConfig) -> list[dict[str, Any]]:
    """The facts the caption suite judges, one row per annotation."""
    checks = inspect_images(raws, limits)
    first_seen: dict[str, str] = {}
    rows = []
    for row, raw in enumerate(raws):
        annotation_id = raw.meta.get("annotation_id")
        annotation_key = f"{raw.source}:{annotation_id}" if annotation_id is not None else None
        rows.append({
            "row": row, "id": _storable(raw.id),
            "structure": "; ".join(raw.problems) or None,
            "annotation_key": _storable(annotation_key),
            "image_listed": raw.meta.get("image_entries", 0) > 0,
            "image_listings": raw.meta.get("image_entries", 0),
            **_image_columns(raw, checks),
            "caption": _storable(raw.turns[-1][1]),
            "valid_utf8": _valid_utf8(raw),
            "control_characters": control_characters(raw),
            "duplicate_of": _duplicate_of(raw, first_seen),
        })
    return rows


def _storable(text: str | None) -> str | None:
    """Text a DataFrame can hold: a lone surrogate becomes '?' (the UTF-8 rule reports it)."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def _fingerprint(raw: RawRecord) -> str:
    content = json.dumps([raw.template, raw.input, raw.turns, raw.image], ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()


def instruction_rows(raws: list[RawRecord], limits: ValidationConfig,
                     counter: TokenCounter) -> list[dict[str, Any]]:
    """The facts the instruction suite judges, one row per record (all sources together)."""
    first_seen: dict[str, str] = {}
    checks = inspect_images(raws, limits)
    rows = []
    for row, raw in enumerate(raws):
        outputs = [text for role, text in raw.turns if role == "assistant"]
        complete = outputs and all(isinstance(t, str) for t in outputs)
        shortest = min(outputs, key=lambda t: len(t.strip())) if complete else None
        # the instruction and output columns cover the first user turn and every answer; a later
        # user turn without text is a structure problem
        silent_users = [f"turn {i} has no text" for i in raw.turns_without_text
                        if i > 0 and raw.turns[i][0] == "user"]
        rows.append({
            "row": row, "id": _storable(raw.id),
            "structure": "; ".join(raw.problems + silent_users) or None,
            "instruction": _storable(raw.turns[0][1]) if raw.turns and raw.turns[0][0] == "user" else None,
            "shortest_output": _storable(shortest),
            "valid_utf8": _valid_utf8(raw),
            "control_characters": control_characters(raw),
            "tokens": counter.count(raw) if _valid_utf8(raw) else None,
            "duplicate_of": _duplicate_of(raw, first_seen),
            **{k: v for k, v in _image_columns(raw, checks).items() if k in ("image_status", "image_detail")},
        })
    return rows


# --------------------------------------------------------------------------- great expectations


@cache
def gx_context() -> Any:
    """One ephemeral context per process (the import and set-up cost seconds); no progress bars."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.data_sources.add_pandas("lav2")
    return context


def load_suite(name: str) -> Any:
    """A suite of ``data/suites``; each expectation's rule is also its GX note (Data Docs show notes)."""
    data = json.loads((SUITES / f"{name}.json").read_text(encoding="utf-8"))
    expectations = [{**e, "notes": f"rule: {e['meta']['rule']}"} if "rule" in e.get("meta", {}) else e
                    for e in data["expectations"]]
    return gx.ExpectationSuite(name=data["name"], expectations=expectations, meta=data["meta"])


def run_suite(name: str, rows: list[dict[str, Any]], parameters: dict[str, Any]) -> dict[str, Any]:
    """Validate ``rows`` with suite ``name``; returns the GX result as JSON."""
    context = gx_context()
    source = context.data_sources.get("lav2")
    asset_name = f"{name}-{len(source.assets)}"
    batch_definition = source.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe("all")
    frame = pd.DataFrame(rows).astype(object)
    frame = frame.where(frame.notna(), None)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(
        load_suite(name),
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ID_COLUMNS},
        expectation_parameters=parameters,
    )
    return result.to_json_dict()


def failures_of(result: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """(row, id, rule, value) for every failing row of every expectation, in row order.

    With ``rows``, an image failure's value is its status with the detail (where the path leads,
    the header's size, the decoder's message).
    """
    failures = []
    for outcome in result["results"]:
        config = outcome["expectation_config"]
        rule = config["meta"].get("rule", config["type"])
        column = config["kwargs"]["column"]
        for hit in outcome["result"].get("unexpected_index_list") or []:
            row = int(hit["row"])
            value = _short(hit.get(column))
            if column == "image_status" and rows is not None and rows[row].get("image_detail"):
                value = _short(f"{value}: {rows[row]['image_detail']}", IMAGE_DETAIL_CHARS)
            failures.append({"row": row, "id": hit["id"], "rule": rule, "value": value})
    return sorted(failures, key=lambda failure: failure["row"])


def _short(value: Any, limit: int = 80) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 3] + "..."
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


# --------------------------------------------------------------------------- data docs


DOCS_SITE = "lav2"
# tutorial animations of GX's site template that no page of the site shows (3.3 MB a build)
UNUSED_STATIC = ("glossary_scroller.gif", "validation_failed_unexpected_values.gif")


def build_data_docs(results: Mapping[str, dict[str, Any]], folder: Path, *, run_name: str,
                    validated_at: datetime, markers: Mapping[str, Mapping[str, str]]) -> Path:
    """great-expectations' own Data Docs of ``results`` (suite name -> ``run_suite``'s result) in
    ``folder``, replacing what was there, so its index lists this validation only; returns the index.

    A context of its own (no other validation of this process is rendered) with a filesystem site:
    every expectation with its limits filled in, unexpected counts with example row ids, the
    suites' rules as notes. ``markers`` (suite name -> facts such as the data hash) are shown as the
    batch markers of that suite's page; ``run_name`` and ``validated_at`` as its run.
    """
    if folder.exists():
        shutil.rmtree(folder)
    context = gx.get_context(mode="ephemeral")
    context.add_data_docs_site(DOCS_SITE, {
        "class_name": "SiteBuilder", "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    run_id = RunIdentifier(run_name=run_name, run_time=validated_at)
    for name, result in results.items():
        context.suites.add(load_suite(name))
        shown = ExpectationSuiteValidationResult(**{k: v for k, v in result.items() if k != "id"})
        shown.meta = {**shown.meta, "run_id": run_id,
                      "batch_markers": {**shown.meta.get("batch_markers", {}), **markers.get(name, {})}}
        key = ValidationResultIdentifier(ExpectationSuiteIdentifier(name=name), run_id, batch_identifier=name)
        context.validation_results_store.set(key, shown)
    context.build_data_docs(site_names=[DOCS_SITE])
    for unused in UNUSED_STATIC:
        (folder / "static" / "images" / unused).unlink(missing_ok=True)
    return folder / "index.html"
