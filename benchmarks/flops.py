"""Model FLOPs of a training step, for model FLOPs utilisation (MFU).

The usual accounting: a matmul parameter costs 2 FLOPs per token forward, 2 more backward for
the activation gradient wherever a gradient has to pass, and 2 more for its weight gradient
when the weight itself trains. A frozen base with gradients flowing through every layer is
therefore 4 x matmul parameters per token, full fine-tuning 6 x. The lm_head counts only
for the positions where it is actually computed (a model that projects only the labelled
positions does less work, and gets no credit for work it skips). Attention scores, norms,
embeddings and elementwise adapter terms (bias, scale, gates) are not counted.
Standard library only: the LitGPT venv uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.spec import LlamaShape, VisionShape


def decoder_layer_matmul_params(shape: LlamaShape) -> int:
    """q, k, v, o and the three MLP projections of one decoder layer."""
    d = shape.hidden_size
    kv_width = shape.num_key_value_heads * shape.head_dim
    return d * d * 2 + d * kv_width * 2 + 3 * d * shape.intermediate_size


def lm_head_params(shape: LlamaShape) -> int:
    return shape.hidden_size * shape.vocab_size


@dataclass(frozen=True)
class BackwardPlan:
    """Where a training step needs gradients.

    ``backprop_layers``: decoder layers (counted from the top) that activation gradients pass
    through; ``weight_grad_layers``: layers whose matmul weights train (full fine-tuning);
    ``lm_head_weight_grad``: whether the lm_head weight trains.
    """

    backprop_layers: int
    weight_grad_layers: int = 0
    lm_head_weight_grad: bool = False


def llama_train_flops(shape: LlamaShape, tokens: int, lm_head_tokens: int, plan: BackwardPlan) -> float:
    """Model FLOPs of one training step of the decoder and its lm_head."""
    layer = decoder_layer_matmul_params(shape)
    head = lm_head_params(shape)
    forward = 2 * layer * shape.num_hidden_layers * tokens + 2 * head * lm_head_tokens
    backward_act = 2 * layer * plan.backprop_layers * tokens + 2 * head * lm_head_tokens
    weight_grads = 2 * layer * plan.weight_grad_layers * tokens
    if plan.lm_head_weight_grad:
        weight_grads += 2 * head * lm_head_tokens
    return float(forward + backward_act + weight_grads)


def extra_trainable_flops(trainable_matmul_params: int, tokens: int) -> float:
    """6 x per token for small trainable matmuls beside the frozen base (LoRA factors)."""
    return float(6 * trainable_matmul_params * tokens)


def vision_tower_params(vision: VisionShape) -> int:
    """Matmul parameters of the CLIP tower: patch embedding, encoder layers, visual projection."""
    d = vision.hidden_size
    per_layer = 4 * d * d + 2 * d * vision.intermediate_size
    patch_embed = vision.patch_size * vision.patch_size * 3 * d
    return per_layer * vision.num_hidden_layers + patch_embed + d * vision.projection_dim


def visual_path_flops(vision: VisionShape, llama_width: int, images: int) -> float:
    """Frozen tower forward (2 x), then the trainable bridge (6 x) of docs/METHOD.md §3.

    clip_proj sees the CLIP tokens, the bridge blocks (attention + 4x MLP) see query + CLIP
    tokens, visual_proj sees the query outputs only.
    """
    w = vision.bridge_width
    tower = 2 * vision_tower_params(vision) * vision.num_tokens
    clip_proj = 6 * vision.projection_dim * w * vision.num_tokens
    blocks = 6 * vision.bridge_blocks * 12 * w * w * (vision.num_tokens + vision.n_query)
    visual_proj = 6 * w * llama_width * vision.n_query
    return float((tower + clip_proj + blocks + visual_proj) * images)
