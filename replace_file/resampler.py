"""The perceiver resampler of MiniCPM-Llama3-V 2.5: `query_num` learned queries cross-attend to the
vision tower's patches (2-D sin-cos positions added to the keys only), then `ln_post` and `x @ proj`.

Parameter names match the checkpoint (`attn.in_proj_weight`, `attn.out_proj`, a bare `proj` used as
[in, out]). Attention runs through `scaled_dot_product_attention`, and every weight is used inside the
forward of the module that owns it, so DeepSpeed ZeRO-3 gathers it and peft can wrap `out_proj`.
"""
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


@lru_cache(maxsize=8)
def _sincos_table(embed_dim, rows, cols, device):
    """[rows, cols, embed_dim] float32: first half encodes the column, second half the row (as official)."""
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float32) / (half / 2.0))

    def encode(pos):  # [rows, cols] -> [rows, cols, half]
        out = pos[..., None] * omega
        return torch.cat([out.sin(), out.cos()], dim=-1)

    row = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, cols)
    col = torch.arange(cols, dtype=torch.float32)[None, :].expand(rows, cols)
    return torch.cat([encode(col), encode(row)], dim=-1).to(device)


def sincos_positions(embed_dim, tgt_sizes, device, dtype):
    """Per image, the table rows for its patch grid (row-major), zero-padded to the longest: [B, Lmax, D]."""
    rows, cols = (int(x) for x in tgt_sizes.max(dim=0).values)
    # The official table starts at 70x70 and only grows; slicing an image-sized window keeps values identical.
    table = _sincos_table(embed_dim, max(rows, 70), max(cols, 70), device)
    pos = [table[:h, :w].reshape(h * w, embed_dim) for h, w in tgt_sizes.tolist()]
    return nn.utils.rnn.pad_sequence(pos, batch_first=True).to(dtype)


class ResamplerAttention(nn.Module):
    """nn.MultiheadAttention's math and parameter layout (packed q,k,v), with SDPA inside."""

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query, key, value, key_padding_mask=None):
        """query [B, Q, D], key/value [B, L, D], key_padding_mask [B, L] True where padded."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        batch = query.shape[0]

        def heads(x):
            return x.view(batch, -1, self.num_heads, x.shape[-1] // self.num_heads).transpose(1, 2)

        q, k, v = heads(F.linear(query, w_q, b_q)), heads(F.linear(key, w_k, b_k)), heads(F.linear(value, w_v, b_v))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1]))


class Resampler(GradientCheckpointingLayer):
    """A checkpointable layer: its [images, patches, 4096] activations are the largest left once the vision
    tower is recomputed."""

    def __init__(self, num_queries, embed_dim, num_heads, kv_dim):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))

    def forward(self, x, tgt_sizes):
        """x [B, Lmax, kv_dim] vision features, tgt_sizes [B, 2] patch rows/cols -> [B, num_queries, D]."""
        tgt_sizes = tgt_sizes.cpu()  # a no-op for the training batches, which keep this metadata on the CPU
        lengths = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        key_padding_mask = (torch.arange(x.shape[1])[None, :] >= lengths[:, None]).to(x.device, non_blocking=True)
        x = self.ln_kv(self.kv_proj(x))
        pos = sincos_positions(self.embed_dim, tgt_sizes, x.device, x.dtype)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        out = self.attn(q, x + pos, x, key_padding_mask)
        return self.ln_post(out) @ self.proj
