"""The two operators MemMC-MAE adds to MONAI's transformer blocks (``monai.networks.blocks``): memory-augmented
self-attention for the encoder and multi-level cross-attention for the decoder; and the encoder and decoder layers
built from them and from MONAI's ``SABlock``, ``CrossAttentionBlock``, ``MLPBlock`` and ``TransformerBlock``.

Token tensors are (B, N, D): batch, tokens, channels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import CrossAttentionBlock, MLPBlock, SABlock, TransformerBlock

__all__ = ["MemorySABlock", "MultiLevelCrossAttention", "EncoderLayer", "decoder_layer"]


class MemorySABlock(SABlock):
    """Memory-augmented multi-head self-attention (Meshed-Memory Transformer, Cornia et al. 2020, eq. 2):

        MSA(X) = softmax(Q [K; M_k]^T / sqrt(d)) [V; M_v],  Q, K, V = X W_q, X W_k, X W_v

    with ``memory_slots`` learnable slots ``M_k``, ``M_v`` (per head, shared by every input) appended to the keys and
    values: whatever the input, every query can also attend to what the slots learnt from the normal training
    images. As in M2 the slots enter scaled, keys by sqrt(d_head) and values by sqrt(memory_slots), from a normal
    initialisation of variance 1/d_head and 1/memory_slots. ``memory_slots=0`` is MONAI's ``SABlock`` itself
    (same parameters, same output).

    (B, N, hidden_size) -> (B, N, hidden_size)."""

    def __init__(self, hidden_size: int, num_heads: int, memory_slots: int, qkv_bias: bool = True):
        super().__init__(hidden_size, num_heads, qkv_bias=qkv_bias, use_flash_attention=True)
        self.memory_slots = int(memory_slots)
        if self.memory_slots > 0:
            self.memory_k = nn.Parameter(torch.randn(1, num_heads, self.memory_slots, self.dim_head)
                                         / math.sqrt(self.dim_head))
            self.memory_v = nn.Parameter(torch.randn(1, num_heads, self.memory_slots, self.dim_head)
                                         / math.sqrt(self.memory_slots))

    def memory(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled memory keys and values, (batch, heads, memory_slots, d_head) each."""
        k = math.sqrt(self.dim_head) * self.memory_k
        v = math.sqrt(self.memory_slots) * self.memory_v
        return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)

    def forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:  # noqa: ARG002 (SABlock's signature)
        if self.memory_slots == 0:
            return super().forward(x)
        q, k, v = self.input_rearrange(self.qkv(x))  # each (B, heads, N, d_head)
        mk, mv = self.memory(x.shape[0])
        out = F.scaled_dot_product_attention(q, torch.cat([k, mk], dim=2), torch.cat([v, mv], dim=2),
                                             scale=self.scale)
        return self.drop_output(self.out_proj(self.out_rearrange(out)))


class MultiLevelCrossAttention(nn.Module):
    """Cross-attention from the decoder's tokens to several encoder levels at once (M2's meshed cross-attention,
    eq. 4-5): one cross-attention C (MONAI's ``CrossAttentionBlock``, weights shared by the levels) to each level i,
    weighted by a gate computed from the query and that level's answer, summed:

        out = sum_i alpha_i * C(Y, E_i) / sqrt(L),  alpha_i = sigmoid(W_i [Y; C(Y, E_i)] + b_i)

    With one level it is plain encoder-decoder cross-attention (no gate; the ablation "single-level").

    ``forward(y (B, N, hidden_size), context [L tensors (B, M, context_size)])`` -> (B, N, hidden_size)."""

    def __init__(self, hidden_size: int, num_heads: int, context_size: int, levels: int, qkv_bias: bool = True):
        super().__init__()
        self.levels = int(levels)
        self.attend = CrossAttentionBlock(hidden_size, num_heads, context_input_size=context_size, qkv_bias=qkv_bias,
                                         use_flash_attention=True)
        self.gates = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(self.levels)
                                   ) if self.levels > 1 else nn.ModuleList()

    def forward(self, y: torch.Tensor, context: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(context) != self.levels:
            raise ValueError(f"expected {self.levels} encoder levels, got {len(context)}")
        if self.levels == 1:
            return self.attend(y, context=context[0])
        out = 0.0
        for gate, level in zip(self.gates, context):
            answer = self.attend(y, context=level)
            out = out + torch.sigmoid(gate(torch.cat([y, answer], dim=-1))) * answer
        return out / math.sqrt(self.levels)


class EncoderLayer(nn.Module):
    """A pre-norm ViT layer whose self-attention is memory-augmented: x + MSA(LN(x)), then x + MLP(LN(x)) (MONAI's
    ``MLPBlock``, GELU). (B, N, D) -> (B, N, D)."""

    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int, memory_slots: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = MemorySABlock(hidden_size, num_heads, memory_slots)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MLPBlock(hidden_size, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def decoder_layer(hidden_size: int, mlp_dim: int, num_heads: int, context_size: int, levels: int) -> TransformerBlock:
    """MONAI's ``TransformerBlock`` with cross-attention, its cross-attention made multi-level:
    x + SA(LN(x)), x + MultiLevelCrossAttention(LN(x), encoder levels), x + MLP(LN(x)).
    ``layer(x (B, N, hidden_size), context=[L tensors (B, M, context_size)])``."""
    layer = TransformerBlock(hidden_size, mlp_dim, num_heads, qkv_bias=True, with_cross_attention=True,
                             use_flash_attention=True)
    layer.cross_attn = MultiLevelCrossAttention(hidden_size, num_heads, context_size, levels)
    return layer
