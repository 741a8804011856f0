"""Decoder-only LM (RMSNorm, RoPE, causal SDPA attention with optional grouped-query K/V heads,
SwiGLU), MoE FFN on the layers `moetrain.config.is_moe_layer` picks (moe.every, moe.first_dense_layers).

The model knows nothing of parallelism (DESIGN habit 2): apply_ep/apply_* in moetrain.parallel
and model/tp_plan.apply_tp reshape it after construction. Weights are created uninitialized;
`init_weights(seed)` fills every parameter from a generator keyed by (seed, parameter name[,
global expert id]), so the values do not depend on the layout, the device, or which rank holds
the expert.

Inference: `forward(tokens, cache=...)` takes an optional key/value cache (moetrain.generate.KVCache)
for incremental decoding; training never passes one and runs exactly the code it ran before. The
cache holds, per layer, the RoPE-rotated keys and the values of the `cache.pos` tokens already
seen (model.n_kv_heads heads each: grouped-query attention shares them, it does not repeat
them); a forward with a cache places its S tokens at positions pos..pos+S-1, attends over all
pos+S cached keys, and advances `cache.pos` by S.

Shape legend: B batch, S sequence, L cached + new positions, D dim, V vocab, Hh heads, K K/V heads
(model.n_kv_heads), Dh head dim.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.config import Config, is_moe_layer
from moetrain.moe.experts import GroupedExperts, SwiGLU
from moetrain.moe.layer import MoEAux, MoELayer
from moetrain.moe.peer import PEERLayer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def apply_rope(x_BHSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSD[..., 0::2].float(), x_BHSD[..., 1::2].float()
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHSD)


class Attention(nn.Module):
    """Separate wq/wk/wv (rows = heads x Dh) so tensor parallelism shards each along dim 0 into
    whole heads; forward uses local shapes (heads = rows / Dh), whatever the TP degree.

    Grouped-query attention (n_kv_heads < n_heads): wk/wv have n_kv_heads * Dh rows, and query
    head h reads K/V head h // (n_heads / n_kv_heads) (SDPA's enable_gqa; Hugging Face's repeat_kv).
    A TP rank holding query heads [r*Hh/tp, (r+1)*Hh/tp) holds exactly the K/V heads they read,
    [r*Hkv/tp, (r+1)*Hkv/tp), so the Colwise shards stay self-contained. With n_kv_heads ==
    n_heads the forward is the multi-head one, call for call."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.gqa = n_kv_heads != n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BSD, cos, sin, cache=None):
        """`cache`: None (training, a whole sequence from position 0) or one layer's view of a
        KVCache (`.pos` tokens held, `.append(k, v)` -> all keys and values). The cache is a
        keyword argument: tp_plan's PrepareModuleInput sees the same three positional inputs."""
        B, S, _ = x_BSD.shape
        q, k, v = (lin(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2) for lin in (self.wq, self.wk, self.wv))
        if cache is None:
            q, k = apply_rope(q, cos[:S], sin[:S]), apply_rope(k, cos[:S], sin[:S])
            if self.gqa:
                y_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                y_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y_BHSD = self._attend_cached(q, k, v, cos, sin, cache, self.gqa)
        return self.wo(y_BHSD.transpose(1, 2).reshape(B, S, -1))

    @staticmethod
    def _attend_cached(q_BHSD, k_BKSD, v_BKSD, cos, sin, cache, gqa=False) -> torch.Tensor:
        """Queries at positions pos..pos+S-1 against the L = pos+S cached keys: query i sees keys
        0..pos+i (the causal mask's bottom-right corner). The cache holds the K K/V heads
        (n_kv_heads, not repeated)."""
        S, start = q_BHSD.shape[2], cache.pos
        c, s = cos[start:start + S], sin[start:start + S]
        k_BKLD, v_BKLD = cache.append(apply_rope(k_BKSD, c, s), v_BKSD)
        q_BHSD = apply_rope(q_BHSD, c, s)
        L = k_BKLD.shape[2]
        gqa_kw = {"enable_gqa": True} if gqa else {}
        if L == S:            # prefill from position 0: the training mask
            return F.scaled_dot_product_attention(q_BHSD, k_BKLD, v_BKLD, is_causal=True, **gqa_kw)
        if S == 1:            # one new token sees every cached key
            return F.scaled_dot_product_attention(q_BHSD, k_BKLD, v_BKLD, **gqa_kw)
        mask_SL = torch.ones(S, L, dtype=torch.bool, device=q_BHSD.device).tril(L - S)
        return F.scaled_dot_product_attention(q_BHSD, k_BKLD, v_BKLD, attn_mask=mask_SL, **gqa_kw)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        m, e = cfg.model, cfg.moe
        self.attn_norm = RMSNorm(m.dim, m.norm_eps)
        self.attn = Attention(m.dim, m.n_heads, m.kv_heads)
        self.ffn_norm = RMSNorm(m.dim, m.norm_eps)
        self.is_moe = is_moe_layer(cfg, layer_id)
        self.is_peer = self.is_moe and e.layer == "peer"
        if self.is_peer:
            p = e.peer
            self.ffn = PEERLayer(m.dim, p.num_keys, p.heads, p.top_k, p.key_dim, p.query_bn)
            self.ffn.sparse_grads = p.sparse_updates
        elif self.is_moe:
            self.ffn = MoELayer(e, m.dim, cfg.expert_hidden)
        else:
            self.ffn = SwiGLU(m.dim, m.ffn_hidden)

    def forward(self, x, cos, sin, prev_logits=None, cache=None):
        x = x + (self.attn(self.attn_norm(x), cos, sin) if cache is None
                 else self.attn(self.attn_norm(x), cos, sin, cache=cache))
        h = self.ffn_norm(x)
        if self.is_peer:
            return x + self.ffn(h), None
        if self.is_moe:
            y, aux = self.ffn(h, prev_logits)
            return x + y, aux
        return x + self.ffn(h), None


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.embed = nn.Embedding(m.vocab_size, m.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(m.n_layers))
        self.norm = RMSNorm(m.dim, m.norm_eps)
        self.head = nn.Linear(m.dim, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(m.max_seq_len, m.dim // m.n_heads, m.rope_theta, "cpu")
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens_BS: torch.Tensor, cache=None) -> tuple[torch.Tensor, list[MoEAux]]:
        """(logits_BSV, one MoEAux per MoE layer). `cache` (inference only, see the module
        docstring): the tokens continue the cached ones; it is advanced by S."""
        if cache is not None and cache.pos + tokens_BS.shape[1] > self.rope_cos.shape[0]:
            raise ValueError(f"position {cache.pos + tokens_BS.shape[1] - 1} is beyond model.max_seq_len="
                             f"{self.rope_cos.shape[0]}")
        x = self.embed(tokens_BS)
        # the residual stream is at least fp32, also when FSDP all-gathers bf16 weights
        # (parallel.fsdp_param_dtype): autocast rounds what each matmul reads, never the stream
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        auxes: list[MoEAux] = []
        prev_logits = None
        for i, layer in enumerate(self.layers):
            if cache is None:
                x, aux = layer(x, self.rope_cos, self.rope_sin, prev_logits)
            else:
                x, aux = layer(x, self.rope_cos, self.rope_sin, prev_logits, cache=cache.layers[i])
            if aux is not None:
                auxes.append(aux)
                prev_logits = aux.logits
        if cache is not None:
            cache.advance(tokens_BS.shape[1])
        return self.head(self.norm(x)), auxes

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.layers if b.is_moe and not b.is_peer]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Layout-independent init: each tensor (each expert slice) from its own keyed generator."""
        std = self.cfg.model.init_std
        out_std = std / math.sqrt(2 * self.cfg.model.n_layers)
        experts = {id(mod): mod for mod in self.modules() if isinstance(mod, GroupedExperts)}
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                if isinstance(mod, (RMSNorm, nn.BatchNorm1d)):
                    p.fill_(1.0 if p_name == "weight" else 0.0)
                    continue
                scale = out_std if p_name == "w2" or name.endswith(("wo.weight", "w2.weight")) else std
                if id(mod) in experts:
                    for i in range(p.shape[0]):
                        g = _generator(seed, f"{name}[{mod.expert_ids[i]}]")
                        p[i].copy_(torch.randn(p.shape[1:], generator=g) * scale)
                elif isinstance(mod, PEERLayer) and p_name.startswith("expert_"):
                    # PEER tables: rows generated in fixed blocks keyed by global row, so any
                    # EP shard of the table gets the same values without building all N rows
                    _init_rows(p, mod.row_offset, seed, name, scale)
                else:
                    g = _generator(seed, name)
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


_ROW_BLOCK = 4096


def _init_rows(p: torch.Tensor, row_offset: int, seed: int, name: str, scale: float) -> None:
    rows = p.shape[0]
    first_block, last_block = row_offset // _ROW_BLOCK, (row_offset + rows - 1) // _ROW_BLOCK
    for b in range(first_block, last_block + 1):
        g = _generator(seed, f"{name}[rows {b}]")
        block = torch.randn((_ROW_BLOCK,) + tuple(p.shape[1:]), generator=g) * scale
        lo, hi = max(b * _ROW_BLOCK, row_offset), min((b + 1) * _ROW_BLOCK, row_offset + rows)
        p[lo - row_offset:hi - row_offset].copy_(block[lo - b * _ROW_BLOCK:hi - b * _ROW_BLOCK])


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))


def count_params(model: Transformer, cfg: Config) -> tuple[int, int]:
    """(total, active per token) parameters of the full model, whatever is held locally."""
    total = active = 0
    seen: set = set()
    for mod in model.modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:       # tied embeddings count once
                continue
            seen.add(id(p))
            # shapes are global: a sharded parameter (TP, FSDP) is a DTensor of the whole tensor
            if isinstance(mod, GroupedExperts):
                per_expert = p.shape[1:].numel()
                total += per_expert * cfg.num_ffn_experts
                active += per_expert * cfg.routed_top_k
            elif isinstance(mod, PEERLayer) and p_name.startswith("expert_"):
                per_expert = p[0].numel()
                total += per_expert * mod.num_experts
                active += per_expert * mod.heads * mod.top_k
            else:
                total += p.numel()
                active += p.numel()
    return total, active
