"""The one configuration schema of the project.

Every run, flow and DVC stage is described by one ``Config``. It is validated before any
tensor is allocated or any heavy library imported: this module imports pydantic only.
Field names of the architecture blocks follow the transformers config keys, so a local
checkpoint's ``config.json`` can be checked against them directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
LinearName = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_LINEARS: tuple[LinearName, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- model


class LlamaArch(Strict):
    """Shape of a Llama-family decoder (keys as in transformers' ``LlamaConfig``)."""

    vocab_size: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt | None = None
    max_position_embeddings: PositiveInt = 2048
    rms_norm_eps: Annotated[float, Field(gt=0)] = 1e-6
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> LlamaArch:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class ClipVisionArch(Strict):
    """Shape of a CLIP vision tower (keys as in transformers' ``CLIPVisionConfig``)."""

    image_size: PositiveInt = 224
    patch_size: PositiveInt = 14
    num_channels: PositiveInt = 3
    hidden_size: PositiveInt = 1024
    intermediate_size: PositiveInt = 4096
    num_hidden_layers: PositiveInt = 24
    num_attention_heads: PositiveInt = 16
    projection_dim: PositiveInt = 768
    layer_norm_eps: Annotated[float, Field(gt=0)] = 1e-5

    @model_validator(mode="after")
    def _patches_tile(self) -> ClipVisionArch:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        return self

    @property
    def num_tokens(self) -> int:
        """CLS plus one token per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1


class BaseLlamaConfig(Strict):
    """The frozen language model: a local transformers folder, an architecture, or both.

    With only ``arch`` the model is built from it (random weights, or the meta device for
    parameter counts). With ``path`` the weights load from that folder; ``arch``, when also
    given, must match its ``config.json`` and lets ``lav2 params`` run where the folder is absent.
    """

    path: Path | None = None
    arch: LlamaArch | None = None
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    quantize: Literal["none", "int8", "nf4"] = Field(
        default="none",
        description="store the frozen decoder linears in 4-bit NF4 (double quantisation, as QLoRA) or "
        "per-channel int8; adapter tensors stay in the compute dtype; a quantised base cannot be folded",
    )

    @model_validator(mode="after")
    def _path_or_arch(self) -> BaseLlamaConfig:
        if self.path is None and self.arch is None:
            raise ValueError("give `path` (a local checkpoint folder) or `arch` (a tiny config), or both")
        return self


class VisionTowerConfig(Strict):
    """The frozen CLIP vision tower: a local folder, an architecture, or both (as for the base)."""

    path: Path | None = None
    arch: ClipVisionArch | None = None

    @model_validator(mode="after")
    def _path_or_arch(self) -> VisionTowerConfig:
        if self.path is None and self.arch is None:
            raise ValueError("give `path` (a local CLIP folder) or `arch` (a tiny config), or both")
        return self


class VisualBridgeConfig(Strict):
    """The trainable path from CLIP tokens to visual prompts (docs/METHOD.md §3)."""

    n_query: PositiveInt = 10
    width: PositiveInt = 768
    n_blocks: NonNegativeInt = 8
    n_heads: PositiveInt = 16
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0
    output_gain: Annotated[float, Field(gt=0)] = Field(
        default=1.0, description="initial weight of the bridge's output LayerNorm, so the visual prompts' "
        "initial scale (the released code: 1)",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> VisualBridgeConfig:
        if self.width % self.n_heads:
            raise ValueError("width must be divisible by n_heads")
        return self


class AdapterConfig(Strict):
    """Every switch of docs/METHOD.md §1; defaults are the paper's."""

    bias_targets: list[LinearName] = Field(default_factory=lambda: list(ALL_LINEARS))
    scale_position: Literal["output", "input", "none"] = "output"
    prompt_len: NonNegativeInt = 10
    prompt_layers: NonNegativeInt | None = Field(
        default=None, description="number of last layers with adaptation prompts; None = n_layers - 2"
    )
    gate: Literal["head", "scalar"] = "head"
    visual_fusion: Literal["early", "additive"] = "early"
    visual_layers: NonNegativeInt = Field(default=1, description="K: first layers fed visual prompts (early)")
    visual: VisualBridgeConfig = Field(default_factory=VisualBridgeConfig)
    lora_rank: NonNegativeInt = 0
    lora_alpha: Annotated[float, Field(gt=0)] = 16.0
    lora_targets: list[LinearName] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    gate_init: Literal["zero", "random"] = Field(
        default="zero", description="random only for the ablation of zero-init gating"
    )

    @field_validator("bias_targets", "lora_targets")
    @classmethod
    def _unique_targets(cls, values: list[LinearName]) -> list[LinearName]:
        if len(set(values)) != len(values):
            raise ValueError("a layer is listed twice")
        return values

    def resolved_prompt_layers(self, n_layers: int) -> int:
        return n_layers - 2 if self.prompt_layers is None else self.prompt_layers


OcrEngine = Literal["rapidocr", "tesseract"]
RAPIDOCR_LANGUAGES = ("eng", "chi_sim")  # what the PP-OCR model in RapidOCR's wheel reads


class ExpertConfig(Strict):
    """An image-to-text model whose output enters the template's input slot."""

    kind: Literal["caption", "ocr"]
    optional: bool = False
    model: str | None = Field(default=None, description="caption: folder or models:/name@alias")
    engine: OcrEngine | None = Field(
        default=None,
        description="ocr only; None means rapidocr (its models ship in the wheel: nothing to install); "
        "tesseract needs the tesseract binary and its language data",
    )
    language: str = Field(default="eng", description="ocr: a Tesseract language code, e.g. eng, deu")

    @field_validator("engine")
    @classmethod
    def _engine_for_ocr(cls, engine: OcrEngine | None, info: ValidationInfo) -> OcrEngine | None:
        if engine is not None and info.data.get("kind") != "ocr":
            raise ValueError("an engine is chosen for ocr experts only")
        return engine

    @field_validator("language")
    @classmethod
    def _language_the_engine_reads(cls, language: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "ocr" and (info.data.get("engine") or "rapidocr") == "rapidocr" \
                and language not in RAPIDOCR_LANGUAGES:
            raise ValueError(f"the rapidocr engine reads {list(RAPIDOCR_LANGUAGES)}; "
                             f"for {language!r} choose engine: tesseract")
        return language

    @property
    def ocr_engine(self) -> OcrEngine:
        return self.engine or "rapidocr"


class ModelConfig(Strict):
    base: BaseLlamaConfig
    vision: VisionTowerConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    experts: list[ExpertConfig] = Field(default_factory=list)


# --------------------------------------------------------------------------- data


class CaptionSource(Strict):
    name: str
    format: Literal["coco"] = "coco"
    annotations: Path
    images: Path


class InstructionSource(Strict):
    name: str
    format: Literal["alpaca", "self_instruct", "llava"]
    path: Path
    image_root: Path | None = None


class ValidationConfig(Strict):
    """Great Expectations thresholds; failing records are quarantined, never dropped silently."""

    on_failure: Literal["quarantine", "stop"] = "quarantine"
    max_failure_fraction: Fraction = 0.05
    caption_min_chars: NonNegativeInt = 1
    caption_max_chars: PositiveInt = 1000
    image_min_side: PositiveInt = 8
    image_max_side: PositiveInt = 8192
    max_image_pixels: PositiveInt = 40_000_000
    max_tokens: PositiveInt = 512
    tokenizer: Path | None = Field(
        default=None,
        description="folder of the tokenizer that counts tokens; None: UTF-8 bytes + 2, an upper bound "
        "for byte-level BPE and byte-fallback SentencePiece",
    )

    @model_validator(mode="after")
    def _ordered_bounds(self) -> ValidationConfig:
        if self.caption_min_chars > self.caption_max_chars:
            raise ValueError("caption_min_chars exceeds caption_max_chars")
        if self.image_min_side > self.image_max_side:
            raise ValueError("image_min_side exceeds image_max_side")
        return self


class ShardConfig(Strict):
    samples_per_shard: PositiveInt = 1000
    loader_workers: NonNegativeInt = 0
    shuffle_buffer: NonNegativeInt = 1000


class DemoDataConfig(Strict):
    """Sizes of the generated demo data set (deterministic for a given seed)."""

    seed: int = 0
    n_images: PositiveInt = 240
    captions_per_image: PositiveInt = 5
    image_size: PositiveInt = 64
    n_instructions: PositiveInt = 1200
    n_conversations: PositiveInt = 480
    n_probe_images: PositiveInt = 100


class GroundedSource(Strict):
    """Questions whose answers the images fix (JSON list of {id, image, attribute, question, answer}).

    Evaluation asks each question about its image and about a blank image (the blind control)
    and scores the parsed answers; the demo generator writes such a set about new drawings.
    """

    questions: Path
    images: Path


class DataConfig(Strict):
    captions: list[CaptionSource] = Field(default_factory=list)
    instructions: list[InstructionSource] = Field(default_factory=list)
    holdout_fraction: Fraction = 0.1
    work_dir: Path = Path("artifacts/data")
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    demo: DemoDataConfig | None = None
    grounded: GroundedSource | None = None


# --------------------------------------------------------------------------- training


class GroupOptimConfig(Strict):
    """AdamW for one parameter group; lr = base_lr * effective batch / 256 when scaled."""

    base_lr: Annotated[float, Field(gt=0)]
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    warmup_steps: NonNegativeInt = 0
    min_lr: Annotated[float, Field(ge=0)] = 0.0


class CheckpointConfig(Strict):
    every_steps: PositiveInt = 100
    keep_last: PositiveInt = 3
    keep_best: bool = True


class DistributedConfig(Strict):
    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # A collective that waits this long for another rank raises: the rank exits and torchrun
    # stops the job instead of leaving it waiting (torch's own default is 30 min for gloo).
    timeout_s: PositiveInt = 1800


class DemoBaseTraining(Strict):
    """The demo-only stage that trains the tiny frozen base LM (and its tokenizer) on the demo text."""

    steps: PositiveInt = 400
    batch_size: PositiveInt = 16
    lr: Annotated[float, Field(gt=0)] = 3e-3
    warmup_steps: NonNegativeInt = 20
    max_tokens: PositiveInt = 128
    seed: int = 0
    reading_texts: NonNegativeInt = Field(
        default=0, description="generated scenes in words with a question or a restating caption, read "
        "besides the demo text: the base learns to say back what its context holds (data.demo.reading_tasks)",
    )


class DemoClipTraining(Strict):
    """The demo-only stage that trains the tiny CLIP tower contrastively on the demo's image-caption pairs.

    The text tower exists only to train the vision tower (CLIP's contrastive loss); the adapter
    uses the vision tower and its projection alone, as real runs use a pretrained CLIP.
    """

    steps: PositiveInt = 600
    batch_size: PositiveInt = 64
    lr: Annotated[float, Field(gt=0)] = 2e-3
    warmup_steps: NonNegativeInt = 30
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    text_hidden_size: PositiveInt = 64
    text_layers: PositiveInt = 2
    text_heads: PositiveInt = 4
    text_vocab_size: PositiveInt = 384
    max_tokens: PositiveInt = 32
    seed: int = 0


class TrainingConfig(Strict):
    schedule: Literal["joint", "two_phase"] = "joint"
    trainable: Literal["disjoint", "all"] = Field(
        default="disjoint", description="all: every adapter parameter on every batch (ablation)"
    )
    caption_ratio: Fraction = Field(default=0.5, description="share of steps that are caption batches")
    multimodal_instructions: bool = Field(
        default=True,
        description="false: instruction batches leave out samples with an image, as in the paper, where "
        "only the captions pair text with images (an ablation)",
    )
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 4
    grad_accum: PositiveInt = 1
    scale_lr: bool = True
    visual: GroupOptimConfig = Field(
        default_factory=lambda: GroupOptimConfig(base_lr=1e-4, weight_decay=0.05)
    )
    language: GroupOptimConfig = Field(
        default_factory=lambda: GroupOptimConfig(base_lr=1e-3, weight_decay=0.02)
    )
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    max_tokens_caption: PositiveInt = 96
    max_tokens_instruction: PositiveInt = 512
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = Field(
        default=False,
        description="recompute each decoder layer of the frozen Llama in the backward instead of keeping "
        "its activations: less memory for more step time",
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval_every_steps: PositiveInt = 100
    log_every_steps: PositiveInt = 10
    output_dir: Path = Path("artifacts/train")
    demo_base: DemoBaseTraining = Field(default_factory=DemoBaseTraining)
    demo_clip: DemoClipTraining = Field(default_factory=DemoClipTraining)

    def max_tokens(self, task: Literal["caption", "instruction"]) -> int:
        """A task's sample length limit, in training and in the held-out loss alike."""
        return self.max_tokens_caption if task == "caption" else self.max_tokens_instruction


# --------------------------------------------------------------------------- tracking


class GuardConfig(Strict):
    """A metric that may worsen by at most ``tolerance`` against the champion (first: the baseline)."""

    tolerance: Annotated[float, Field(ge=0)]
    greater_is_better: bool = Field(default=True, description="false for a metric where lower is better "
                                    "(a loss): the guard then holds if it rises by at most the tolerance")


class PromotionConfig(Strict):
    """The gate: ``metric`` must beat the zero-init baseline and the champion by ``margin``."""

    metric: str = "caption_cider"
    margin: Annotated[float, Field(ge=0)] = 0.0
    greater_is_better: bool = True
    alias: str = "champion"
    beat_baseline: bool = Field(
        default=True,
        description="refuse a version that lacks or does not beat baseline_<metric> (the zero-init model's); "
        "false only for smoke runs whose few steps cannot beat anything",
    )
    guards: dict[str, GuardConfig] = Field(
        default_factory=dict,
        description="metric -> how far it may fall below the champion's (or, first, the baseline's), "
        "higher being better; or metric -> {tolerance, greater_is_better: false} for a metric where "
        "lower is better (it may then rise by at most the tolerance)",
    )

    @field_validator("guards", mode="before")
    @classmethod
    def _a_bare_tolerance_is_higher_is_better(cls, guards: Any) -> Any:
        """``{metric: 0.05}`` (the first form, kept) is ``{metric: {tolerance: 0.05}}``."""
        if not isinstance(guards, dict):
            return guards
        return {metric: {"tolerance": guard} if isinstance(guard, int | float) and not isinstance(guard, bool)
                else guard for metric, guard in guards.items()}


class TrackingConfig(Strict):
    uri: str | None = Field(default=None, description="None: sqlite:///<root>/mlruns/mlflow.db")
    artifact_root: Path | None = Field(default=None, description="None: <root>/mlruns/artifacts")
    experiment: str = "llama-adapter-v2"
    registered_model: str = "llama-adapter-v2"
    enabled: bool = Field(default=True, description="false: no MLflow at all (tests, overhead benchmark)")
    system_metrics: bool = True
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)


# --------------------------------------------------------------------------- serving


class ServingConfig(Strict):
    """What the served model (the registered pyfunc) accepts from a request."""

    image_roots: list[Path] | None = Field(
        default=None,
        description="folders a request's server-side image path must resolve inside (symlinks "
        "followed); None: the data sources' image folders (data.captions[].images, "
        "data.instructions[].image_root); []: no paths, base64 images only",
    )

    def allowed_image_roots(self, data: DataConfig) -> list[Path]:
        if self.image_roots is not None:
            return list(self.image_roots)
        roots = [source.images for source in data.captions]
        roots += [source.image_root for source in data.instructions if source.image_root is not None]
        return list(dict.fromkeys(roots))


# --------------------------------------------------------------------------- orchestration


class WorkPoolConfig(Strict):
    name: str
    type: Literal["process", "docker", "kubernetes"] = "process"
    gpus: NonNegativeInt = 0
    image: str | None = None
    env: dict[str, str] = Field(default_factory=dict)


class OrchestrationConfig(Strict):
    cpu_pool: WorkPoolConfig = Field(default_factory=lambda: WorkPoolConfig(name="cpu"))
    gpu_pool: WorkPoolConfig = Field(
        default_factory=lambda: WorkPoolConfig(name="gpu", type="docker", gpus=1)
    )


# --------------------------------------------------------------------------- root


class Config(Strict):
    name: str
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
