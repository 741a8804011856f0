"""Autoregressive sampling from a Transformer: a key/value cache, logit filtering, the loop.

KV cache layout. `KVCache(n_layers, max_len)` holds, for each layer, two tensors
k, v [B, K, max_len, Dh] with K = model.n_kv_heads (grouped-query attention stores each shared
K/V head once; the query heads read them through SDPA's enable_gqa) (allocated at the first append, in the dtype and on the device of the
keys), of which positions [0, pos) are filled: keys AFTER RoPE (each at its own position, so they
never need rotating again) and values. `Transformer.forward(tokens_BS, cache)` puts its S tokens at
positions pos..pos+S-1, appends their keys and values to every layer and advances pos by S; a
position beyond max_len (= model.max_seq_len, the length of the RoPE tables) is refused.
Generation = one forward over the prompt (prefill), then one forward per new token of that one
token. Its logits equal those of a full forward over the whole sequence (to float rounding)
whenever every FFN layer computes each token on its own (attention is causal), see
`noncausal_reason`. One sequence at a time (B = 1 in `generate`; the cache itself takes any B
whose sequences share positions).

Sampling rules, in this order, on the last position's logits:
  1. temperature T: logits / T; T = 0 is greedy (argmax, first index on ties; steps 2-4 skipped);
  2. top-k (k > 0): keep the logits >= the k-th largest (ties at the k-th value are all kept);
  3. top-p (p < 1, nucleus): of the tokens left, keep the most probable ones, in decreasing
     probability, until their probability (softmax of the filtered logits) reaches p; the most
     probable token is always kept;
  4. draw from the softmax of what is left with a torch.Generator seeded by `seed` (the same
     seed, model, prompt and device give the same tokens).
Removed tokens get -inf. Token ids at or above `vocab_limit` (ids the tokenizer cannot decode, when
the model's vocabulary is padded past the tokenizer's) are removed before step 1.

Layers that are not per-token at inference (`noncausal_reason`): a capacity-bound token-choice
router (tokens compete for expert slots: `inference_config` makes these dropless), expert choice
(experts pick tokens among the batch, no dropless mode), and PEER with query batch norm (batch
statistics in eval too). For those, a token's output depends on the other tokens of the forward,
so a cache cannot reproduce the full forward: `generate` then runs the full prefix at every step
(use_cache=None picks this automatically), i.e. each new token is sampled from the last position
of a full forward over the sequence so far.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from moetrain.config import Config, replace_keys
from moetrain.moe.router import ROUTERS


class GenerateError(ValueError):
    """One line: a request that cannot be generated (bad sampling settings, prompt too long...)."""


# ----------------------------------------------------------------------------- the cache


class _LayerKV:
    """One layer's keys and values; `pos` is the owning cache's."""

    def __init__(self, owner: "KVCache"):
        self._owner = owner
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def pos(self) -> int:
        return self._owner.pos

    def append(self, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store S new keys/values (K = n_kv_heads heads) at pos..pos+S-1; return keys and values
        of positions [0, pos+S)."""
        B, K, S, Dh = k_BKSD.shape
        start, end = self.pos, self.pos + S
        if end > self._owner.max_len:
            raise GenerateError(f"position {end - 1} is beyond model.max_seq_len={self._owner.max_len}")
        if self.k is None:
            shape = (B, K, self._owner.max_len, Dh)
            self.k = k_BKSD.new_empty(shape)
            self.v = v_BKSD.new_empty(shape)
        self.k[:, :, start:end] = k_BKSD
        self.v[:, :, start:end] = v_BKSD
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of the tokens seen so far, for every layer (layout: module docstring)."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.layers = [_LayerKV(self) for _ in range(n_layers)]

    def advance(self, n: int) -> None:
        """Called by Transformer.forward once every layer has appended its n tokens."""
        self.pos += n


# ----------------------------------------------------------------------------- model checks


def inference_config(cfg: Config) -> tuple[Config, list[str]]:
    """(config to build the model for generation, notes on what changed). A capacity-bound
    token-choice router becomes dropless (moe.capacity_factor=null): with a capacity, whether a
    token's expert copies are kept depends on the other tokens of the forward."""
    e = cfg.moe
    if e.num_experts == 0 or e.layer != "moe" or e.capacity_factor is None or not ROUTERS[e.router].dropless:
        return cfg, []
    note = (f"moe.capacity_factor {e.capacity_factor} -> null (dropless): with a capacity a token's output "
            "would depend on the other tokens of the forward")
    return replace_keys(cfg, {"moe.capacity_factor": None}), [note]


def noncausal_reason(model: torch.nn.Module) -> Optional[str]:
    """Why a token's output depends on other tokens of the same forward (so a KV cache cannot
    reproduce the full forward), or None when every layer is per-token."""
    for i, block in enumerate(model.layers):
        if getattr(block, "is_peer", False):
            if block.ffn.query_bn is not None:
                return f"layer {i}: PEER query batch norm uses the statistics of the whole forward (moe.peer.query_bn)"
        elif getattr(block, "is_moe", False):
            router = block.ffn.router
            if not router.spec.token_choice:
                return f"layer {i}: router '{router.kind}' lets experts pick among all the tokens of the forward"
            if router.cfg.capacity_factor is not None:
                return (f"layer {i}: moe.capacity_factor={router.cfg.capacity_factor} lets tokens compete for "
                        "expert capacity")
    return None


# ----------------------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise GenerateError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise GenerateError(f"--top-k {top_k} must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise GenerateError(f"--top-p {top_p} must be in (0, 1] (1 = off)")


def check_request(prompt_ids: Sequence[int], max_new_tokens: int, vocab_size: int, max_seq_len: int) -> None:
    """The prompt's ids are in the vocabulary and prompt + new tokens fit the positions (no
    sliding window: positions past model.max_seq_len are refused, not slid)."""
    if not prompt_ids:
        raise GenerateError("the prompt has no tokens (give text, or start from the end-of-document token)")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise GenerateError(f"prompt token id {bad[0]} is outside the model's vocabulary "
                            f"(model.vocab_size={vocab_size})")
    if max_new_tokens < 0:
        raise GenerateError(f"--max-new-tokens {max_new_tokens} must be >= 0")
    n = len(prompt_ids)
    if n + max_new_tokens > max_seq_len:
        raise GenerateError(f"prompt ({n} tokens) + --max-new-tokens {max_new_tokens} = {n + max_new_tokens} "
                            f"positions exceed model.max_seq_len={max_seq_len} (no sliding window: "
                            + (f"use at most {max_seq_len - n} new tokens)" if n <= max_seq_len
                               else "shorten the prompt)"))


def filter_logits(logits_V: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Steps 1-3 of the sampling rules (module docstring) for temperature > 0, on the last dim:
    scaled logits with the removed tokens at -inf."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise GenerateError("temperature 0 is greedy: nothing to filter (take the argmax)")
    out = logits_V.float() / temperature
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1:
        probs, order = torch.softmax(out, dim=-1).sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs                  # mass of the more probable tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> int:
    """One token id from one position's logits [V] (sampling rules 1-4)."""
    if temperature == 0:
        return int(torch.argmax(logits_V))
    probs = torch.softmax(filter_logits(logits_V, temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ----------------------------------------------------------------------------- the loop


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]                 # includes the end-of-document token when it stopped there
    stop: str                          # "eod" | "max_new_tokens"
    used_cache: bool
    seconds: float                     # prefill + decoding
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_ids) / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eod_id: Optional[int] = None, stop_at_eod: bool = True, use_cache: Optional[bool] = None,
             vocab_limit: Optional[int] = None) -> Generation:
    """Sample up to `max_new_tokens` after `prompt_ids` (one sequence, on the model's device).
    use_cache: None = with a cache unless `noncausal_reason(model)` (then the full prefix every
    step, with a note saying why); True on such a model is refused. Stops early at `eod_id` when
    `stop_at_eod`."""
    check_sampling(temperature, top_k, top_p)
    if any(m.training for m in model.modules()):
        raise GenerateError("the model is in training mode (call model.eval(): routers add noise in training)")
    vocab, max_len = model.cfg.model.vocab_size, model.cfg.model.max_seq_len
    prompt = [int(t) for t in prompt_ids]
    check_request(prompt, max_new_tokens, vocab, max_len)
    reason = noncausal_reason(model)
    notes = []
    if use_cache is None:
        use_cache = reason is None
        if reason:
            notes.append(f"no KV cache, the whole prefix runs at every step: {reason}")
    elif use_cache and reason:
        raise GenerateError(f"a KV cache cannot reproduce this model's forward: {reason}")

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    # sized to this request, not to model.max_seq_len (Mixtral's 32k positions would be GBs)
    cache = KVCache(len(model.layers), len(prompt) + max_new_tokens) if use_cache else None
    new: list[int] = []
    stop = "max_new_tokens"
    t0 = time.perf_counter()
    step_in = ids
    for _ in range(max_new_tokens):
        logits_BSV, _aux = model(step_in, cache) if use_cache else model(ids)
        logits_V = logits_BSV[0, -1]
        if vocab_limit is not None and vocab_limit < vocab:
            logits_V = logits_V.clone()
            logits_V[vocab_limit:] = float("-inf")
        tok = sample_next(logits_V, temperature, top_k, top_p, gen)
        new.append(tok)
        nxt = torch.tensor([[tok]], dtype=torch.long, device=device)
        ids = torch.cat([ids, nxt], dim=1)
        step_in = nxt
        if stop_at_eod and eod_id is not None and tok == eod_id:
            stop = "eod"
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Generation(prompt, new, stop, bool(use_cache), time.perf_counter() - t0, notes)
