"""The visual path (docs/METHOD.md §3): frozen CLIP tokens -> trainable bridge -> visual prompts.

image -> frozen CLIP tower -> all last-layer tokens (CLS + patches), post-layernorm and the
      CLIP visual projection when the tower has one (as the MM release does)
      -> clip_proj (Linear + LayerNorm)
      -> [visual_query ; projected tokens] -> a few pre-norm transformer blocks
      -> first n_query outputs -> visual_proj (Linear to the LLM width + LayerNorm)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional
from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

from llama_adapter_v2.config.schema import VisualBridgeConfig
from llama_adapter_v2.model.trainable import AdapterModule, Trainable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ClipTower = CLIPVisionModel | CLIPVisionModelWithProjection


class ImageShapeError(ValueError):
    """Images that the frozen tower cannot take: wrong rank, channel count or size."""


class FrozenClipEncoder(nn.Module):
    """Runs the frozen tower without autograd and returns every token of its last layer."""

    def __init__(self, tower: ClipTower) -> None:
        super().__init__()
        self.tower = tower.requires_grad_(False).eval()
        config = tower.config
        self.image_size: int = config.image_size
        self.num_channels: int = config.num_channels
        projection = getattr(tower, "visual_projection", None)
        self.width: int = config.projection_dim if projection is not None else config.hidden_size

    def train(self, mode: bool = True) -> FrozenClipEncoder:
        """The tower stays in eval mode: it is frozen, and must act the same in training."""
        super().train(mode)
        self.tower.eval()
        return self

    def check_images(self, images: torch.Tensor) -> None:
        expected = (self.num_channels, self.image_size, self.image_size)
        if images.dim() != 4:
            raise ImageShapeError(
                f"images must be a (batch, {', '.join(map(str, expected))}) tensor; "
                f"got shape {tuple(images.shape)}"
            )
        if images.shape[1] != self.num_channels:
            raise ImageShapeError(
                f"images have {images.shape[1]} channels; the CLIP tower takes {self.num_channels} "
                f"(RGB, shape (batch, {', '.join(map(str, expected))}))"
            )
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ImageShapeError(
                f"images are {images.shape[2]}x{images.shape[3]} pixels; the CLIP tower takes "
                f"{self.image_size}x{self.image_size} (use the model's image_transform)"
            )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        vision = getattr(self.tower, "vision_model", self.tower)
        images = images.to(dtype=vision.embeddings.patch_embedding.weight.dtype)
        tokens = vision.post_layernorm(vision(pixel_values=images).last_hidden_state)
        projection = getattr(self.tower, "visual_projection", None)
        return projection(tokens) if projection is not None else tokens


class BridgeBlock(nn.Module):
    """A pre-norm transformer block (self-attention + GELU MLP), as in ViT."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = (
            functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        )
        x = x + self.proj(attended)
        return x + self.fc2(functional.gelu(self.fc1(self.norm2(x))))


class VisualBridge(AdapterModule):
    """The trainable visual path: CLIP tokens (B, N, clip_width) -> visual prompts (B, n_query, llm_width)."""

    def __init__(self, clip_width: int, llm_width: int, cfg: VisualBridgeConfig) -> None:
        super().__init__()
        self.clip_proj = nn.Linear(clip_width, cfg.width)
        self.clip_proj_norm = nn.LayerNorm(cfg.width)
        self.visual_query = nn.Parameter(torch.empty(cfg.n_query, cfg.width))
        self.blocks = nn.ModuleList(
            BridgeBlock(cfg.width, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_blocks)
        )
        self.visual_proj = nn.Linear(cfg.width, llm_width)
        self.visual_proj_norm = nn.LayerNorm(llm_width)
        nn.init.normal_(self.visual_query)
        nn.init.constant_(self.visual_proj_norm.weight, cfg.output_gain)

    def adapter_params(self) -> dict[str, Trainable]:
        """The whole bridge trains with the captions (visual group); its matrices decay."""
        return {
            name: Trainable("visual", "visual", decays=parameter.ndim >= 2)
            for name, parameter in self.named_parameters()
        }

    @property
    def n_query(self) -> int:
        return self.visual_query.shape[0]

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.clip_proj_norm(self.clip_proj(clip_tokens.to(self.clip_proj.weight.dtype)))
        queries = self.visual_query.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = torch.cat([queries, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : self.n_query]))


@dataclass(frozen=True)
class ClipImageTransform:
    """PIL image -> normalised (3, size, size) float tensor: shorter side resized (bicubic),
    centre crop, CLIP mean and std. A plain dataclass so data-loader workers can pickle it."""

    size: int

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        factor = self.size / min(width, height)
        resized = (max(self.size, round(width * factor)), max(self.size, round(height * factor)))
        image = image.resize(resized, Image.Resampling.BICUBIC)
        left, top = (resized[0] - self.size) // 2, (resized[1] - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        return (pixels - mean) / std
