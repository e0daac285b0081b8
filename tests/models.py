"""Small reference models for the per-example probe's tests and benchmark (nothing is downloaded).

- :func:`mlp`: the digits MLP shape (Linear/ReLU stack).
- :class:`SmallCNN`: Conv2d + GroupNorm + in-place ReLU + pooling + Linear head.
- :class:`CharTransformer`: a small causal character-level transformer language model
  (token and position Embeddings, pre-LayerNorm blocks with Linear attention projections and
  an MLP, RMSNorm before an untied head), batch first, token-mean cross-entropy loss.
- :func:`char_batches`: random windows of a text file (e.g. tinyshakespeare) as ``(x, y)`` ids.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["mlp", "SmallCNN", "CharTransformer", "char_data", "char_batches"]


def mlp(d_in: int = 64, hidden: int = 256, d_out: int = 10, depth: int = 2, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """``[B, C, H, W] -> [B, classes]``: two conv blocks (GroupNorm, in-place ReLU, max-pool)."""

    def __init__(
        self, in_ch: int = 3, width: int = 32, classes: int = 10, *, inplace: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        self.inplace = inplace
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, 2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x)), inplace=self.inplace), 2)
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x)), inplace=self.inplace), 2)
        return self.head(x.mean((2, 3)))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Causal character-level LM: ``ids [B, T] -> logits [B, T, vocab]``."""

    def __init__(
        self, vocab: int = 65, d: int = 64, heads: int = 4, layers: int = 2, block: int = 256, *, seed: int = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(1 if m is not self.head else 2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        # position ids with the batch dimension (HF-style ``position_ids [B, T]``): every layer
        # sees the batch on dim 0, so the position embedding's per-example gradients exist too
        pos = torch.arange(T, device=ids.device).repeat(B, 1)
        x = self.tok(ids) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Token-mean cross-entropy over the whole batch."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def char_data(path: str) -> tuple[torch.Tensor, list[str]]:
    """The text at ``path`` as a 1-D tensor of character ids, and the vocabulary."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), vocab


def char_batches(data: torch.Tensor, batch: int, seq: int, n: int, *, seed: int = 0):
    """``n`` batches of random windows: ``(x [batch, seq], y [batch, seq])`` (next-character targets)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        idx = start.unsqueeze(1) + torch.arange(seq + 1).unsqueeze(0)
        w = data[idx]
        out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return out
