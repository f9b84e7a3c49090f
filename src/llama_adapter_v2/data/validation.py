"""Great Expectations validation with quarantine: clean records go on, failing ones are kept aside.

Python does what GX cannot see (decoding images, counting tokens, fingerprinting duplicates)
and puts the facts in columns; the suites in ``data/suites/*.json`` judge those columns, with
thresholds from ``data.validation`` as suite parameters. Every failing row is named by id and
rule (``result_format=COMPLETE`` with the id as index column). Input count = clean + quarantined,
always: a record is either clean or in the quarantine file with every rule it broke.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from llama_adapter_v2.config.schema import ValidationConfig
from llama_adapter_v2.data.readers import RawRecord

SUITES = Path(__file__).with_name("suites")
ID_COLUMNS = ["row", "id"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class ValidationStoppedError(RuntimeError):
    """Too many records failed (or any, with ``on_failure: stop``); the message names counts and report."""


@dataclass(frozen=True)
class ImageCheck:
    status: str
    width: int | None = None
    height: int | None = None
    mode: str | None = None


def inspect_image(path: str | Path, max_pixels: int) -> ImageCheck:
    """Open, bound-check (from the header, before decoding), decode and convert to RGB."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        return ImageCheck("missing file")
    if file.stat().st_size == 0:
        return ImageCheck("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return ImageCheck(f"decompression bomb guard: header says {width}x{height}")
                image.load()
                image.convert("RGB")
                return ImageCheck("ok", width, height, image.mode)
    except Image.DecompressionBombError as err:
        return ImageCheck(f"decompression bomb guard: {err}")
    except UnidentifiedImageError:
        return ImageCheck("not an image")
    except (OSError, SyntaxError, ValueError) as err:
        return ImageCheck(f"truncated or corrupt: {err}")


# --------------------------------------------------------------------------- token counting


class TokenCounter:
    """Tokens per record with a real tokenizer, or UTF-8 bytes + 2 (BOS/EOS) as an upper bound."""

    def __init__(self, tokenizer_dir: Path | None):
        self.tokenizer = None
        self.description = "utf-8 bytes + 2 (upper bound; data.validation.tokenizer not set)"
        if tokenizer_dir is not None:
            if not any((Path(tokenizer_dir) / name).is_file() for name in TOKENIZER_FILES):
                raise FileNotFoundError(f"data.validation.tokenizer: {tokenizer_dir} holds no tokenizer")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            self.description = f"tokenizer at {tokenizer_dir}"

    def count(self, raw: RawRecord) -> int | None:
        from llama_adapter_v2.data.formatting import encode_record, segments

        if not _complete(raw):
            return None
        record = raw.to_record()
        if self.tokenizer is None:
            return len("".join(text for text, _ in segments(record)).encode("utf-8", "replace")) + 2
        return len(encode_record(record, self.tokenizer, 10**9)[0])


def _complete(raw: RawRecord) -> bool:
    return not raw.problems and all(isinstance(text, str) for _, text in raw.turns)


def _valid_utf8(raw: RawRecord) -> bool:
    """JSON escapes can smuggle lone surrogates (\\ud800) that no UTF-8 file can hold."""
    texts = [text for _, text in raw.turns if text] + [raw.input or ""]
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- tables


def inspect_images(raws: list[RawRecord], limits: ValidationConfig) -> dict[str, ImageCheck]:
    """Each distinct image once (five captions share one image)."""
    return {p: inspect_image(p, limits.max_image_pixels) for p in sorted({r.image for r in raws if r.image})}


def caption_rows(raws: list[RawRecord], limits: ValidationConfig) -> list[dict[str, Any]]:
    """The facts the caption suite judges, one row per annotation."""
    checks = inspect_images(raws, limits)
    rows = []
    for row, raw in enumerate(raws):
        check = checks.get(raw.image) if raw.image else None
        annotation_id = raw.meta.get("annotation_id")
        rows.append({
            "row": row, "id": raw.id,
            "structure": "; ".join(raw.problems) or None,
            "annotation_key": f"{raw.source}:{annotation_id}" if annotation_id is not None else None,
            "image_listed": raw.meta.get("image_entries", 0) > 0,
            "image_listings": raw.meta.get("image_entries", 0),
            "image_status": check.status if check else None,
            "image_width": check.width if check and check.status == "ok" else None,
            "image_height": check.height if check and check.status == "ok" else None,
            "caption": raw.turns[-1][1],
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
        fingerprint = _fingerprint(raw)
        duplicate_of = first_seen.setdefault(fingerprint, raw.id)
        outputs = [text for role, text in raw.turns if role == "assistant"]
        complete = outputs and all(t is not None for t in outputs)
        shortest = min(outputs, key=lambda t: len(t.strip())) if complete else None
        rows.append({
            "row": row, "id": raw.id,
            "structure": "; ".join(raw.problems) or None,
            "instruction": _storable(raw.turns[0][1]) if raw.turns and raw.turns[0][0] == "user" else None,
            "shortest_output": _storable(shortest),
            "valid_utf8": _valid_utf8(raw),
            "tokens": counter.count(raw) if _valid_utf8(raw) else None,
            "duplicate_of": None if duplicate_of == raw.id else duplicate_of,
            "image_status": checks[raw.image].status if raw.image else None,
        })
    return rows


# --------------------------------------------------------------------------- great expectations


@cache
def gx_context() -> Any:
    """One ephemeral context per process (the import and set-up cost seconds); no progress bars."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.data_sources.add_pandas("lav2")
    return context


def load_suite(name: str) -> Any:
    import great_expectations as gx

    data = json.loads((SUITES / f"{name}.json").read_text(encoding="utf-8"))
    return gx.ExpectationSuite(name=data["name"], expectations=data["expectations"], meta=data["meta"])


def run_suite(name: str, rows: list[dict[str, Any]], parameters: dict[str, Any]) -> dict[str, Any]:
    """Validate ``rows`` with suite ``name``; returns the GX result as JSON."""
    import pandas as pd

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


def failures_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """(row, id, rule, value) for every failing row of every expectation."""
    failures = []
    for outcome in result["results"]:
        config = outcome["expectation_config"]
        rule = config["meta"].get("rule", config["type"])
        column = config["kwargs"]["column"]
        for hit in outcome["result"].get("unexpected_index_list") or []:
            failures.append({"row": int(hit["row"]), "id": hit["id"], "rule": rule,
                             "value": _short(hit.get(column))})
    return failures


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 80:
        return value[:77] + "..."
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)
