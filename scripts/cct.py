"""A small Compact Convolutional Transformer (CCT) for the offline image benchmark of issue 24.

CCT is Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers"
(arXiv 2104.05704), the image model of AutoMerge (arXiv 2601.22748): a convolutional
tokenizer (Conv2d + ReLU + MaxPool2d per layer) turns the image into tokens, a few transformer
encoder layers mix them, and sequence pooling (a learned softmax weighting of the tokens)
replaces the class token. This is a plain `torch.nn.Module` written from the paper and its
reference code (SHI-Labs/Compact-Transformers, `cct.py`, `utils/tokenizer.py`,
`utils/transformers.py`), scaled down for scikit-learn's 8x8 digits, with two changes that
do not alter the design: the encoder layers are plain pre-norm (the reference code puts a
LayerNorm between attention and MLP and none before the MLP), and there is no dropout or
stochastic depth (the benchmark trains for seconds, deterministically).

A forward hook sees 4-D activations (batch, channels, h, w) in `tokenizer` and 3-D ones
(batch, tokens, embed_dim) from `position` on, so a trace segmentation separates the two
parts. Tensor names (the names merged per block):

    tokenizer.{0,3,...}.weight                 conv kernels (no bias, as in CCT)
    position.embedding                         learned positional embedding (1, tokens, dim)
    blocks.{i}.norm1.{weight,bias}             pre-norm before attention
    blocks.{i}.attn.qkv.weight                 query, key, value in one Linear (no bias, as CCT)
    blocks.{i}.attn.proj.{weight,bias}         attention output projection
    blocks.{i}.norm2.{weight,bias}             pre-norm before the MLP
    blocks.{i}.mlp.fc1.{weight,bias}, blocks.{i}.mlp.fc2.{weight,bias}
    norm.{weight,bias}                         final LayerNorm
    pool.{weight,bias}                         sequence pooling: one score per token
    head.{weight,bias}                         classifier

The constructor takes only JSON-able keyword arguments, so `{"module": "cct:CCT", "kwargs":
{...}}` is enough to rebuild the module; weights are initialised from torch's global generator
(deterministic given `torch.manual_seed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pooled_size(size: int, conv_layers: int) -> int:
    # Conv2d (stride 1, padding k // 2) keeps the size for odd kernels; MaxPool2d(3, 2, 1) maps
    # n to (n - 1) // 2 + 1.
    for _ in range(conv_layers):
        size = (size - 1) // 2 + 1
    return size


class PositionalEmbedding(nn.Module):
    """A learned embedding added to every token (a module, so that a trace hook sees it)."""

    def __init__(self, tokens: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(1, tokens, embed_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.embedding


class Attention(nn.Module):
    """Multi-head self-attention with one bias-free Linear for query, key and value."""

    def __init__(self, embed_dim: int, heads: int) -> None:
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head_dim)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, embed_dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = Attention(embed_dim, heads)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = MLP(embed_dim, int(embed_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CCT(nn.Module):
    """Compact Convolutional Transformer: conv tokenizer, encoder layers, sequence pooling.

    Args:
        channels: input image channels.
        image_size: input height and width (square images).
        embed_dim: token width, also the channels of every conv layer.
        conv_layers: Conv2d + ReLU + MaxPool2d groups in the tokenizer; each halves h and w.
        kernel_size: conv kernel size (odd, so that padding keeps the size).
        heads: attention heads per encoder layer.
        layers: encoder layers.
        mlp_ratio: MLP hidden width over embed_dim.
        classes: output logits.

    Raises:
        ValueError: if embed_dim is not divisible by heads or kernel_size is even.
    """

    def __init__(
        self,
        channels: int = 1,
        image_size: int = 8,
        embed_dim: int = 64,
        conv_layers: int = 1,
        kernel_size: int = 3,
        heads: int = 2,
        layers: int = 2,
        mlp_ratio: float = 2,
        classes: int = 10,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        convs: list[nn.Module] = []
        for index in range(conv_layers):
            convs += [
                nn.Conv2d(
                    channels if index == 0 else embed_dim,
                    embed_dim,
                    kernel_size,
                    padding=kernel_size // 2,
                    bias=False,
                ),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            ]
        self.tokenizer = nn.Sequential(*convs)
        tokens = _pooled_size(image_size, conv_layers) ** 2
        self.position = PositionalEmbedding(tokens, embed_dim)
        self.blocks = nn.ModuleList(
            EncoderLayer(embed_dim, heads, mlp_ratio) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.pool = nn.Linear(embed_dim, 1)
        self.head = nn.Linear(embed_dim, classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the reference code: kaiming normal for convs, truncated normal for Linear weights
        # (std 0.02) and the positional embedding (std 0.2), zero biases, LayerNorm (1, 0).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.position.embedding, std=0.2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes) for images (batch, channels, image_size, image_size)."""
        features = self.tokenizer(pixel_values)  # (batch, embed_dim, h, w)
        x = self.position(features.flatten(2).transpose(1, 2))  # (batch, h * w, embed_dim)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        weights = torch.softmax(self.pool(x), dim=1)  # (batch, tokens, 1)
        return self.head((weights.transpose(1, 2) @ x).squeeze(1))
