"""Build the adapted model from a ``Config``: local folders when present, else the declared ``arch``.

A base given only by ``arch`` gets random weights drawn from a fixed seed, so every build of the
same config (training, resuming, evaluating, folding) sees the same frozen base. On the meta
device nothing is allocated: ``lav2 params`` counts the 7B and 8B configs in seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from llama_adapter_v2.config.layer_plan import plan_layers
from llama_adapter_v2.config.loader import CLIP_MODEL_TYPES, LLAMA_MODEL_TYPES
from llama_adapter_v2.config.schema import BaseLlamaConfig, Config, VisionTowerConfig
from llama_adapter_v2.model.adapter import LlamaAdapterV2, decoder_linears
from llama_adapter_v2.model.quantize import quantize_linear
from llama_adapter_v2.model.vision import ClipTower

ARCH_ONLY_SEED = 0


class BaseModelError(ValueError):
    """The base or tower folder is missing, unreadable, or not the kind of model the method wraps."""


def build_model(
    cfg: Config, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaAdapterV2:
    """The adapted model, base and tower frozen, adapter parameters trainable, on ``device``."""
    device = torch.device(device)
    base = build_base(cfg.model.base, device=device, dtype=dtype)
    plan = plan_layers(cfg.model.adapter, base.config.num_hidden_layers)
    clip = build_clip(cfg.model.vision, device=device, dtype=dtype) if plan.uses_images else None
    model = LlamaAdapterV2(base, cfg.model.adapter, plan, clip=clip, model_config=cfg.model)
    return model.to(device=device)


def _config_json(folder: Path, key: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise BaseModelError(
            f"{key}: {folder} has no config.json (expected a transformers checkpoint folder)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BaseModelError(f"{key}: {path} is not valid JSON ({err})") from None


def _existing_folder(path: Path | None, key: str, device: torch.device) -> Path | None:
    """The folder to load from, or None to build from ``arch``; a missing folder is an error
    except on the meta device, where only shapes matter."""
    if path is None:
        return None
    if path.exists():
        return path
    if device.type == "meta":
        return None
    raise BaseModelError(
        f"{key}: folder {path} not found; build it (or point the path at a local checkpoint). "
        "Only the meta device (lav2 params) may stand in the declared `arch` for missing weights."
    )


def _config_json_of_type(folder: Path, key: str, model_types: frozenset[str], wanted: str) -> dict[str, Any]:
    """``config.json`` of a folder that must hold one of ``model_types``; the error says what is wanted."""
    data = _config_json(folder, key)
    if data.get("model_type") not in model_types:
        raise BaseModelError(f"{key}: {folder} holds a {data.get('model_type')!r} model; {wanted}")
    return data


def llama_config(base: BaseLlamaConfig) -> LlamaConfig:
    """The transformers config of the base: from its folder when present, else from ``arch``."""
    if base.path is not None and base.path.exists():
        wanted = "LLaMA-Adapter V2 wraps Llama-family checkpoints (config.json model_type 'llama') only"
        _config_json_of_type(base.path, "model.base.path", LLAMA_MODEL_TYPES, wanted)
        config = LlamaConfig.from_pretrained(base.path, local_files_only=True)
    else:
        assert base.arch is not None  # the schema demands path or arch
        config = LlamaConfig(**base.arch.model_dump())
    config._attn_implementation = base.attn_implementation
    return config


def build_base(base: BaseLlamaConfig, *, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    config = llama_config(base)
    folder = _existing_folder(base.path, "model.base.path", device)
    if folder is not None and device.type != "meta":
        model = LlamaForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=dtype, attn_implementation=base.attn_implementation
        )
        return quantize_base(model.to(device), base).eval()
    return quantize_base(_seeded_build(LlamaForCausalLM, config, device, dtype), base).eval()


def quantize_base(model: LlamaForCausalLM, base: BaseLlamaConfig) -> LlamaForCausalLM:
    """Replace the decoder linears by ``model.base.quantize``'s kind, one at a time (each
    full-precision weight can be freed as soon as its quantised copy exists). Embeddings, norms
    and the lm_head stay as they are. On the meta device nothing is quantised: only shapes count."""
    if base.quantize == "none" or model.device.type == "meta":
        return model
    for owner, name in decoder_linears(model):
        setattr(owner, name, quantize_linear(getattr(owner, name), base.quantize))
    return model


def _seeded_build(model_class: Any, config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights from a fixed seed, created directly on ``device`` in ``dtype``."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(ARCH_ONLY_SEED)
        return model_class._from_config(config, dtype=dtype)


def _has_visual_projection(folder: Path) -> bool:
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            if any(key.endswith("visual_projection.weight") for key in handle.keys()):  # noqa: SIM118
                return True
    return False


def build_clip(vision: VisionTowerConfig, *, device: torch.device, dtype: torch.dtype) -> ClipTower:
    """The frozen CLIP vision tower, with its visual projection when the checkpoint has one."""
    folder = _existing_folder(vision.path, "model.vision.path", device)
    if vision.path is not None and vision.path.exists():
        wanted = "not a CLIP checkpoint"
        data = _config_json_of_type(vision.path, "model.vision.path", CLIP_MODEL_TYPES, wanted)
        config = CLIPVisionConfig.from_pretrained(vision.path, local_files_only=True)
        if data["model_type"] == "clip":  # a full CLIP folder keeps the projection width at the top
            config.projection_dim = data.get("projection_dim", config.projection_dim)
        with_projection = _has_visual_projection(vision.path)
    else:
        assert vision.arch is not None
        config = CLIPVisionConfig(**vision.arch.model_dump())
        with_projection = True
    tower_class = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    if folder is not None and device.type != "meta":
        return _load_tower(tower_class, folder, config, dtype).to(device).eval()
    return _seeded_build(tower_class, config, device, dtype).eval()


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _stored_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _load_tower(tower_class: Any, folder: Path, config: Any, dtype: torch.dtype) -> ClipTower:
    """The vision tower of a CLIP folder; a full CLIPModel's text tower is left out without a report.

    transformers reports every unexpected key (the whole text tower) as a warning table; a
    missing vision weight is what matters, and that stays an error naming the keys.
    """
    modeling_logger = logging.getLogger("transformers.modeling_utils")
    no_report = _DropLoadReport()
    modeling_logger.addFilter(no_report)  # not the level: transformers runs other checks at other levels
    try:
        tower = tower_class.from_pretrained(folder, config=config, local_files_only=True, dtype=dtype)
    finally:
        modeling_logger.removeFilter(no_report)
    missing = sorted(set(tower.state_dict()) - _stored_keys(folder))
    if missing:
        raise BaseModelError(f"model.vision.path: {folder} lacks {len(missing)} tower weights: {missing[:3]}")
    return tower


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the base folder (local files only)."""
    path = cfg.model.base.path
    if path is None or not path.exists():
        raise BaseModelError(
            f"model.base.path: the tokenizer is read from the base folder, and {path} is not there"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
