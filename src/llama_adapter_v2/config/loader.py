"""Load a YAML config, validate it, and check what no single field can check alone.

Every error names the file and the dotted key. Nothing here imports torch: a bad config
must fail in well under a second, before any tensor exists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llama_adapter_v2.config.layer_plan import AdapterConfigError, plan_layers
from llama_adapter_v2.config.schema import (
    BaseLlamaConfig,
    ClipVisionArch,
    Config,
    LlamaArch,
    VisionTowerConfig,
)

LLAMA_MODEL_TYPES = frozenset({"llama"})
CLIP_MODEL_TYPES = frozenset({"clip", "clip_vision_model"})


class ConfigError(ValueError):
    """A config problem, with the file and every offending key in the message."""

    def __init__(self, source: Path | str, problems: list[tuple[str, str]]):
        self.source = str(source)
        self.problems = problems
        lines = [f"{self.source}: {key}: {message}" for key, message in problems]
        super().__init__("invalid config\n  " + "\n  ".join(lines))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def project_root_of(config_file: Path) -> Path:
    """Relative paths in a config resolve against the project it belongs to."""
    for folder in config_file.resolve().parents:
        if (folder / "pyproject.toml").is_file() or (folder / "dvc.yaml").is_file():
            return folder
    return config_file.resolve().parent


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, [("<file>", "no such file")]) from None
    except UnicodeDecodeError as err:
        raise ConfigError(path, [("<file>", f"not UTF-8 text ({err.reason} at byte {err.start})")]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(path, [("<yaml>", f"{err.problem or err} at {where}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(path, [("<root>", f"expected a mapping, found {type(raw).__name__}")])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str], source: Path) -> None:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to the raw mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(source, [(item, "override must look like dotted.key=value")])
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(source, [(key, f"`{part}` is not a mapping")])
            node = child
        node[parts[-1]] = yaml.safe_load(value)


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def _resolve_paths(model: BaseModel, root: Path) -> None:
    """Make every relative Path field absolute against ``root``, in place."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(model, name, root / value)
        elif isinstance(value, BaseModel):
            _resolve_paths(value, root)
        elif isinstance(value, list):
            for position, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _resolve_paths(item, root)
                elif isinstance(item, Path) and not item.is_absolute():
                    value[position] = root / item


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def checkpoint_llama_arch(folder: Path) -> tuple[LlamaArch | None, str | None]:
    """The architecture a local Llama folder declares, or why it is not one."""
    data = _read_json(folder / "config.json")
    if data is None:
        return None, f"{folder} has no config.json"
    model_type = data.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        return None, f"{folder} is not a Llama-family checkpoint (model_type={model_type!r})"
    fields = {k: data[k] for k in LlamaArch.model_fields if data.get(k) is not None}
    rope = data.get("rope_parameters")
    if "rope_theta" not in fields and isinstance(rope, dict) and rope.get("rope_theta") is not None:
        fields["rope_theta"] = rope["rope_theta"]  # transformers 5 nests it (Llama 3's 500000 included)
    return LlamaArch(**fields), None


def checkpoint_clip_arch(folder: Path) -> tuple[ClipVisionArch | None, str | None]:
    data = _read_json(folder / "config.json")
    if data is None:
        return None, f"{folder} has no config.json"
    if data.get("model_type") == "clip":
        # a full CLIPModel: the tower's shape is nested, its projection width is top-level
        data = {**data.get("vision_config", {}), "projection_dim": data.get("projection_dim")}
    elif data.get("model_type") not in CLIP_MODEL_TYPES:
        return None, f"{folder} is not a CLIP checkpoint (model_type={data.get('model_type')!r})"
    fields = {k: data[k] for k in ClipVisionArch.model_fields if data.get(k) is not None}
    return ClipVisionArch(**fields), None


def _architecture_problems(
    key: str, declared: BaseModel | None, path: Path | None, read: Any
) -> Iterator[tuple[str, str]]:
    if path is None or not path.exists():
        if declared is None:
            yield f"{key}.path", f"folder {path} not found and no `arch` to build from"
        return
    found, why = read(path)
    if found is None:
        yield f"{key}.path", why
        return
    if declared is not None:
        for field, value in found.model_dump().items():
            if getattr(declared, field) != value:
                yield f"{key}.arch.{field}", (
                    f"{getattr(declared, field)!r} differs from {value!r} in {path / 'config.json'}"
                )


def _resolved_arch(part: BaseLlamaConfig | VisionTowerConfig, key: str, read: Any) -> Any:
    """A part's architecture: from its local folder when present, else the declared one."""
    if part.path is not None and part.path.exists():
        arch, why = read(part.path)
        if arch is None:
            raise ConfigError(part.path, [(f"{key}.path", why or "unreadable")])
        return arch
    assert part.arch is not None  # guaranteed by validation
    return part.arch


def resolved_llama_arch(cfg: Config) -> LlamaArch:
    return _resolved_arch(cfg.model.base, "model.base", checkpoint_llama_arch)


def resolved_clip_arch(cfg: Config) -> ClipVisionArch:
    return _resolved_arch(cfg.model.vision, "model.vision", checkpoint_clip_arch)


def _layer_problems(cfg: Config, n_layers: int) -> list[tuple[str, str]]:
    try:
        plan_layers(cfg.model.adapter, n_layers)
    except AdapterConfigError as err:
        return err.problems
    return []


def _training_problems(cfg: Config) -> Iterator[tuple[str, str]]:
    training = cfg.training
    if training.precision == "fp16" and training.device == "cpu":
        yield "training.precision", "fp16 needs a CUDA device; use fp32 or bf16 on the CPU"
    if training.distributed.backend == "nccl" and training.device == "cpu":
        yield "training.distributed.backend", "nccl needs CUDA; use gloo or auto on the CPU"
    if training.distributed.strategy == "fsdp" and training.trainable == "all":
        yield "training.distributed.strategy", (
            "fsdp cannot train with trainable=all: a rank whose instruction batch has no image gives the "
            "visual path no gradient while another rank does, and FSDP2's reduce-scatter needs the same "
            "gradients on every rank; use ddp for this ablation"
        )
    if training.distributed.strategy == "fsdp" and training.precision == "fp16":
        yield "training.distributed.strategy", (
            "fsdp cannot train with precision=fp16 (the gradient scaler's unscale is not built for "
            "sharded gradients); use bf16"
        )
    if training.distributed.strategy == "fsdp" and cfg.model.base.quantize != "none":
        yield "model.base.quantize", (
            f"{cfg.model.base.quantize} with fsdp is not supported (a quantised weight is not sharded the "
            "way FSDP2 shards a plain one); use ddp, or quantize: none"
        )
    if training.caption_ratio > 0 and not cfg.data.captions and cfg.data.demo is None:
        yield "training.caption_ratio", "caption batches asked for but data.captions is empty"
    if training.caption_ratio < 1 and not cfg.data.instructions and cfg.data.demo is None:
        yield "training.caption_ratio", "instruction batches asked for but data.instructions is empty"


def consistency_problems(cfg: Config) -> list[tuple[str, str]]:
    """Checks across fields and against local checkpoint folders (JSON only, no weights)."""
    problems = list(
        _architecture_problems("model.base", cfg.model.base.arch, cfg.model.base.path, checkpoint_llama_arch)
    )
    problems += _architecture_problems(
        "model.vision", cfg.model.vision.arch, cfg.model.vision.path, checkpoint_clip_arch
    )
    if not problems:
        problems += _layer_problems(cfg, resolved_llama_arch(cfg).num_hidden_layers)
    problems += _training_problems(cfg)
    return problems


def validate_config(raw: dict[str, Any], source: Path, root: Path | None = None) -> Config:
    """Validate a raw mapping; relative paths resolve against ``root``."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        problems = [(_dotted(e["loc"]), e["msg"]) for e in err.errors()]
        raise ConfigError(source, problems) from None
    _resolve_paths(cfg, root or project_root_of(source))
    if problems := consistency_problems(cfg):
        raise ConfigError(source, problems)
    return cfg


def load_config(path: Path | str, overrides: Iterable[str] = ()) -> Config:
    """Read, override, validate and resolve one YAML config file."""
    source = Path(path)
    raw = read_yaml(source)
    apply_overrides(raw, overrides, source)
    return validate_config(raw, source)
