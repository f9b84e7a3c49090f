"""What every case measures on: one shared model shape and workload, sent to each child as JSON.

Standard library only, so the LitGPT venv (which lacks the project's dependencies) reads the
same spec as the project's cases and the two can never drift apart.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class LlamaShape:
    """A Llama decoder; keys as in transformers' ``LlamaConfig``."""

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376  # Llama's 11008/4096 ratio at width 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionShape:
    """The frozen CLIP tower and the trainable visual bridge of the visual case."""

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    projection_dim: int = 512
    bridge_width: int = 512
    bridge_blocks: int = 4
    bridge_heads: int = 8
    n_query: int = 10

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class Workload:
    """Batch, precision and step counts shared by every case of a run."""

    batch_size: int = 2
    seq_len: int = 256
    label_fraction: float = 0.5  # the response share of each sequence; the rest is prompt (-100)
    threads: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    warmup_steps: int = 2
    timed_steps: int = 5
    prompt_len: int = 10
    prompt_layers: int = 6  # the last n_layers - 2 layers, the project's default
    lora_rank: int = 8
    gen_prompt_tokens: int = 32
    gen_new_tokens: int = 16
    matmul_size: int = 2048
    orchestration_steps: int = 30  # demo-config training steps per bare / pipeline run
    orchestration_pairs: int = 2  # bare + pipeline runs per child
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def label_positions(self) -> int:
        """Positions per sequence whose next token is predicted (labels shifted like HF)."""
        return round(self.seq_len * self.label_fraction)


@dataclass(frozen=True)
class Spec:
    """Everything a child process needs to run one case."""

    preset: str
    llama: LlamaShape = field(default_factory=LlamaShape)
    vision: VisionShape = field(default_factory=VisionShape)
    workload: Workload = field(default_factory=Workload)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            preset=raw["preset"],
            llama=LlamaShape(**raw["llama"]),
            vision=VisionShape(**raw["vision"]),
            workload=Workload(**raw["workload"]),
        )


def preset(name: str) -> Spec:
    """The named shapes: ``cpu`` (the reported one), ``tiny`` (tests), ``gpu-7b`` (bf16 on CUDA)."""
    if name == "cpu":
        return Spec(preset=name)
    if name == "tiny":
        return Spec(
            preset=name,
            llama=LlamaShape(
                vocab_size=256,
                hidden_size=64,
                intermediate_size=176,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=128,
            ),
            vision=VisionShape(
                image_size=32,
                patch_size=8,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=64,
                bridge_width=64,
                bridge_blocks=1,
                bridge_heads=4,
                n_query=4,
            ),
            workload=Workload(
                seq_len=32,
                warmup_steps=1,
                timed_steps=1,
                prompt_len=4,
                prompt_layers=1,
                gen_prompt_tokens=8,
                gen_new_tokens=4,
                matmul_size=128,
            ),
        )
    if name == "gpu-7b":
        return Spec(
            preset=name,
            llama=LlamaShape(
                vocab_size=32000,
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                rms_norm_eps=1e-5,
                max_position_embeddings=4096,
            ),
            vision=VisionShape(
                image_size=224,
                patch_size=14,
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                projection_dim=768,
                bridge_width=768,
                bridge_blocks=8,
                bridge_heads=16,
                n_query=10,
            ),
            workload=Workload(
                batch_size=4,
                seq_len=512,
                threads=8,
                dtype="bfloat16",
                device="cuda",
                warmup_steps=3,
                timed_steps=10,
                prompt_layers=30,
                gen_prompt_tokens=64,
                gen_new_tokens=64,
                matmul_size=8192,
            ),
        )
    raise ValueError(f"unknown preset {name!r}: choose cpu, tiny or gpu-7b")


def with_steps(spec: Spec, *, warmup: int | None, timed: int | None) -> Spec:
    """The spec with other step counts (command-line overrides)."""
    workload = spec.workload
    if warmup is not None:
        workload = replace(workload, warmup_steps=warmup)
    if timed is not None:
        workload = replace(workload, timed_steps=timed)
    return replace(spec, workload=workload)


def with_workload(spec: Spec, assignments: list[str]) -> Spec:
    """The spec with ``key=value`` workload overrides (``--workload orchestration_pairs=1``)."""
    types = {f.name: f.type for f in fields(Workload)}
    changes: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--workload {assignment!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        kind = {"int": int, "float": float, "str": str}[str(types[key])]
        changes[key] = kind(value)
    return replace(spec, workload=replace(spec.workload, **changes))
