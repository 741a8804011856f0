"""moetrain <-> Hugging Face `transformers`: which architecture, the config both ways, the tensors
both ways. Pure functions on dicts and tensors (no files, no transformers import).

Our side is the CONSOLIDATED state dict (world-1 names, experts stacked, see moetrain/growth.py):
GroupedExperts w1, w3 [E, D, He] and w2 [E, He, D] (expert e computes (silu(x w1[e]) * x w3[e]) w2[e]);
dense SwiGLU and shared experts as nn.Linear weights w1, w3 [H, D], w2 [D, H].
HF's side: every projection an nn.Linear weight [out, in]; per-expert keys as save_pretrained
writes them (Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`, the others
`mlp.experts.{e}.gate_proj/up_proj/down_proj`), which from_pretrained loads into its fused
gate_up_proj tensors through its own conversion mapping, without missing or unexpected keys.

Which architecture reproduces our forward (eval mode, dropless)
---------------------------------------------------------------
  dense (moe.num_experts=0)                 LlamaForCausalLM
  MoE, gates renormalized to sum 1, every layer MoE, no shared expert
                                            MixtralForCausalLM: softmax over E, top-k, w/sum(w)
      = router topk with moe.norm_topk_prob and k > 1;
        gshard at eval (u = 0, so its second expert is always dispatched: 2*g2 > 0, and a g2
        that underflows to 0 contributes 0 either way);
        noisy_topk at eval (no noise: softmax over the k largest clean logits = p_i / sum_k p_j;
        its noise weights are dropped), any k (k = 1 gives weight 1, as Mixtral does)
  MoE with raw top-k gates (switch; topk with k = 1 or norm_topk_prob off), dense layers
  (moe.every > 1 or moe.first_dense_layers > 0), or shared experts
                                            Qwen2MoeForCausalLM: norm_topk_prob = whether our gates
      are renormalized; decoder_sparse_step = moe.every (its rule (i+1) % step == 0 is ours);
      mlp_only_layers = [0, .., moe.first_dense_layers - 1] (its rule "not in mlp_only_layers");
      intermediate_size = model.ffn_hidden (dense layers), moe_intermediate_size = expert
      hidden; q/k/v biases written as zeros. Its shared expert is scaled by
      sigmoid(shared_expert_gate x): the gate weight is written as zeros, sigmoid(0) = 0.5
      exactly, and the shared expert's down projection is multiplied by 2 (exact in floating
      point), one shared expert of width expert_hidden * granularity * shared_experts. Without
      shared experts: a width-1 shared expert of zeros (adds exactly 0).
  router aux_free (sigmoid scores, bias for the choice only, chosen scores renormalized)
                                            Glm4MoeForCausalLM: n_group = topk_group = 1,
      routed_scaling_factor 1, norm_topk_prob, e_score_correction_bias = our expert_bias,
      partial_rotary_factor 1, no qk-norm, no attention bias; its shared experts are ungated:
      n_shared_experts = granularity * shared_experts (one of zeros when we have none);
      dense layers only as the first k (first_k_dense_replace = moe.first_dense_layers, with
      moe.every = 1).
  Refused: PEER, MoE++ zero-computation experts, gated residual routing, expert choice.

A model trained with a capacity factor is exported dropless (what inference engines run): the
exported logits equal our eval forward with moe.capacity_factor=null (overflow rerouting and
renormalize_after_drop only act on dropped copies, so they vanish too).

RoPE layout
-----------
Ours rotates interleaved pairs (x[2j], x[2j+1]) by angle pos * theta^(-2j/Dh) (apply_rope);
HF's rotate_half rotates (x[j], x[j + Dh/2]) by the same angle. So within every head, HF row
j = our row 2j and HF row j + Dh/2 = our row 2j + 1 of wq and wk (`HALF_FROM_INTERLEAVED`):
the rotated q and k are permuted alike and q.k is unchanged. wv, wo are not touched. Import
applies the inverse permutation.

Grouped-query attention: model.n_kv_heads <-> num_key_value_heads, both ways, as is: HF's query
head h reads K/V head h // (heads / kv_heads) (repeat_kv), and so does ours (SDPA enable_gqa); the
K/V projections keep their n_kv_heads * head_dim rows (RoPE-permuted per head like wq for wk).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from moetrain.config import Config, has_dense_layers
from moetrain.config import is_moe_layer as config_is_moe_layer


class HFMapError(ValueError):
    """One line: what does not map between moetrain and the transformers architecture, and why."""


@dataclass(frozen=True)
class Arch:
    """How one transformers architecture names its tensors."""
    model_type: str
    class_name: str
    moe_prefix: str = "mlp"                                # the MoE block inside a layer
    expert_names: tuple = ("gate_proj", "up_proj", "down_proj")   # our w1, w3, w2
    router: str = "gate.weight"
    shared: Optional[str] = None                           # shared-expert module name
    shared_gate: Optional[str] = None                      # sigmoid gate of the shared expert
    score_bias: Optional[str] = None                       # selection-only bias (aux-free)
    qkv_bias: bool = False                                 # q/k/v projections carry biases


ARCHS = {a.model_type: a for a in (
    Arch("llama", "LlamaForCausalLM"),
    Arch("mixtral", "MixtralForCausalLM", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
    Arch("qwen2_moe", "Qwen2MoeForCausalLM", shared="shared_expert", shared_gate="shared_expert_gate.weight",
         qkv_bias=True),
    Arch("glm4_moe", "Glm4MoeForCausalLM", shared="shared_experts", score_bias="gate.e_score_correction_bias"),
)}

SHARED_GATE_SCALE = 2.0     # 1 / sigmoid(0): Qwen2-MoE's shared expert output is halved by its zero gate


# ----------------------------------------------------------------------------- RoPE permutation

def half_from_interleaved(head_dim: int) -> torch.Tensor:
    """Row order within a head: HF row r takes our row perm[r] (0, 2, 4, ..., 1, 3, 5, ...)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_heads(w: torch.Tensor, head_dim: int, perm: torch.Tensor) -> torch.Tensor:
    """Apply a row permutation inside every head of a [heads * head_dim, ...] projection."""
    heads = w.shape[0] // head_dim
    return w.reshape(heads, head_dim, *w.shape[1:])[:, perm].reshape(w.shape).contiguous()


def to_hf_rope(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    return permute_heads(w, head_dim, half_from_interleaved(head_dim))


def from_hf_rope(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    return permute_heads(w, head_dim, torch.argsort(half_from_interleaved(head_dim)))


# ----------------------------------------------------------------------------- export: which architecture

@dataclass(frozen=True)
class ExportPlan:
    arch: Arch
    norm_topk_prob: bool = True           # Qwen2-MoE: renormalize the k gates
    notes: tuple = field(default_factory=tuple)


is_moe_layer = config_is_moe_layer      # the one rule (moetrain.config.is_moe_layer)


def plan_export(cfg: Config) -> ExportPlan:
    """The transformers architecture whose forward equals ours for `cfg`, or HFMapError naming
    what does not map."""
    from moetrain.moe.router import ROUTERS
    e = cfg.moe
    if e.num_experts == 0:
        return ExportPlan(ARCHS["llama"])
    if e.layer == "peer":
        raise HFMapError("moe.layer=peer: PEER (product-key retrieval of single-neuron experts) has no "
                         "transformers architecture")
    if e.num_zero_experts > 0:
        raise HFMapError(f"MoE++ zero-computation experts (moe.zero_experts: {e.num_zero_experts}) have no "
                         "transformers architecture")
    if e.gated_residual:
        raise HFMapError("moe.gated_residual: MoE++ routing from the previous MoE layer's logits has no "
                         "transformers architecture")
    spec = ROUTERS[e.router]
    if not spec.token_choice:
        raise HFMapError(f"moe.router={e.router}: experts choose their tokens among the whole batch (not per "
                         "token, not causal); no transformers architecture routes that way")
    notes = []
    if e.capacity_factor is not None:
        notes.append(f"moe.capacity_factor={e.capacity_factor} is not exported: the model is exported dropless, "
                     "as inference engines run it (its logits equal our eval forward with moe.capacity_factor=null)")
    if e.router == "gshard":
        notes.append("router gshard: exported as its eval routing (both experts always dispatched, gates "
                     "renormalized); the random skip of the second expert is training only")
    if e.router == "noisy_topk":
        notes.append("router noisy_topk: exported as its eval routing (no noise); its noise weights are dropped")
    if spec.bias_state:
        if any(is_moe_layer(cfg, i) and not is_moe_layer(cfg, i + 1) for i in range(cfg.model.n_layers - 1)):
            raise HFMapError(f"moe.router={e.router} maps to Glm4Moe, whose dense layers can only be the first k "
                             f"(moe.first_dense_layers); moe.every={e.every} alternates dense and MoE layers")
        if e.num_ffn_experts < 2:
            raise HFMapError(f"moe.router={e.router} with {e.num_ffn_experts} expert: Glm4Moe's router needs >= 2")
        return ExportPlan(ARCHS["glm4_moe"], True, tuple(notes))
    normalized = spec.gates_sum_to_one(e)
    if normalized and not has_dense_layers(cfg) and e.shared_experts == 0:
        return ExportPlan(ARCHS["mixtral"], True, tuple(notes))
    why = [w for w, on in (("shared experts", e.shared_experts > 0), (f"moe.every={e.every}", e.every > 1),
                           (f"moe.first_dense_layers={e.first_dense_layers}", e.first_dense_layers > 0),
                           ("raw top-k gates", not normalized)) if on]
    notes.append(f"{', '.join(why)}: exported as Qwen2-MoE (norm_topk_prob={str(normalized).lower()}; shared "
                 "expert gate zero and its down projection x2; zero q/k/v biases)")
    return ExportPlan(ARCHS["qwen2_moe"], normalized, tuple(notes))


# ----------------------------------------------------------------------------- export: config

def _shared_hidden(cfg: Config) -> int:
    return cfg.expert_hidden * cfg.moe.expert_granularity * cfg.moe.shared_experts


def hf_config(cfg: Config, plan: ExportPlan, dtype: str) -> dict:
    """config.json for plan.arch (dtype: "float32", "bfloat16", ...)."""
    m, e, arch = cfg.model, cfg.moe, plan.arch
    out = {
        "architectures": [arch.class_name], "model_type": arch.model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": m.ffn_hidden,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,     # rope_theta: transformers 4's key
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std, "attention_dropout": 0.0,
        "use_cache": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "dtype": dtype,
        "torch_dtype": dtype,       # what transformers 4 and the engines built on its format read
    }
    if arch.model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif arch.model_type == "mixtral":
        out.update(intermediate_size=cfg.expert_hidden, num_local_experts=e.num_ffn_experts,
                   num_experts_per_tok=e.routed_top_k, sliding_window=None, router_jitter_noise=0.0,
                   router_aux_loss_coef=e.aux_loss_coef, output_router_logits=False)
    elif arch.model_type == "qwen2_moe":
        out.update(num_experts=e.num_ffn_experts, num_experts_per_tok=e.routed_top_k,
                   moe_intermediate_size=cfg.expert_hidden,
                   shared_expert_intermediate_size=_shared_hidden(cfg) or 1,
                   decoder_sparse_step=e.every, mlp_only_layers=list(range(e.first_dense_layers)), norm_topk_prob=plan.norm_topk_prob,
                   qkv_bias=True, use_sliding_window=False, sliding_window=None,
                   router_aux_loss_coef=e.aux_loss_coef, output_router_logits=False)
    elif arch.model_type == "glm4_moe":
        first_moe = next(i for i in range(m.n_layers) if is_moe_layer(cfg, i))
        out.update(n_routed_experts=e.num_ffn_experts, num_experts_per_tok=e.routed_top_k,
                   moe_intermediate_size=cfg.expert_hidden,
                   n_shared_experts=max(1, e.expert_granularity * e.shared_experts),
                   first_k_dense_replace=first_moe, n_group=1, topk_group=1, norm_topk_prob=True,
                   routed_scaling_factor=1.0, use_qk_norm=False, attention_bias=False,
                   num_nextn_predict_layers=0, output_router_logits=False)
        out["rope_parameters"]["partial_rotary_factor"] = 1.0
        out["partial_rotary_factor"] = 1.0
    return out


# ----------------------------------------------------------------------------- export: tensors

def to_hf_state(cfg: Config, plan: ExportPlan, sd: dict) -> dict:
    """Our consolidated state dict -> HF tensors (names as save_pretrained writes them). Every
    tensor of `sd` is used except noisy_topk's noise weights (eval routing has no noise)."""
    m, arch = cfg.model, plan.arch
    Dh = m.head_dim
    used: set = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise HFMapError(f"the checkpoint has no tensor {key}")
        used.add(key)
        return sd[key]

    out = {"model.embed_tokens.weight": take("embed.weight"), "model.norm.weight": take("norm.weight")}
    if m.tie_embeddings:
        used.add("head.weight")
    else:
        out["lm_head.weight"] = take("head.weight")
    for i in range(m.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = take(p + "attn_norm.weight")
        out[q + "post_attention_layernorm.weight"] = take(p + "ffn_norm.weight")
        out[q + "self_attn.q_proj.weight"] = to_hf_rope(take(p + "attn.wq.weight"), Dh)
        out[q + "self_attn.k_proj.weight"] = to_hf_rope(take(p + "attn.wk.weight"), Dh)
        out[q + "self_attn.v_proj.weight"] = take(p + "attn.wv.weight")
        out[q + "self_attn.o_proj.weight"] = take(p + "attn.wo.weight")
        if arch.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                w = out[q + f"self_attn.{proj}.weight"]
                out[q + f"self_attn.{proj}.bias"] = w.new_zeros(w.shape[0])
        if not is_moe_layer(cfg, i):
            for ours, theirs in zip(("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
                out[q + f"mlp.{theirs}.weight"] = take(p + f"ffn.{ours}.weight")
            continue
        b = q + arch.moe_prefix + "."
        out[b + arch.router] = take(p + "ffn.router.weight")
        used.add(p + "ffn.router.noise_weight")
        if arch.score_bias:
            out[b + arch.score_bias] = take(p + "ffn.router.expert_bias").float()
        w1, w3, w2 = (take(p + f"ffn.experts.{n}") for n in ("w1", "w3", "w2"))
        for x in range(w1.shape[0]):
            for t, name in zip((w1[x].t(), w3[x].t(), w2[x].t()), arch.expert_names):
                out[b + f"experts.{x}.{name}.weight"] = t.contiguous()
        if arch.shared:
            s = b + arch.shared + "."
            scale = SHARED_GATE_SCALE if arch.shared_gate else 1.0
            if cfg.moe.shared_experts > 0:
                out[s + "gate_proj.weight"] = take(p + "ffn.shared.w1.weight")
                out[s + "up_proj.weight"] = take(p + "ffn.shared.w3.weight")
                out[s + "down_proj.weight"] = take(p + "ffn.shared.w2.weight") * scale
            else:       # a shared expert of zeros: adds exactly 0
                width = cfg.expert_hidden if arch.model_type == "glm4_moe" else 1
                like = w1
                out[s + "gate_proj.weight"] = like.new_zeros(width, m.dim)
                out[s + "up_proj.weight"] = like.new_zeros(width, m.dim)
                out[s + "down_proj.weight"] = like.new_zeros(m.dim, width)
            if arch.shared_gate:
                out[b + arch.shared_gate] = w1.new_zeros(1, m.dim)
    left = sorted(set(sd) - used)
    if left:
        raise HFMapError(f"tensor {left[0]} has no place in {arch.class_name} ({len(left)} unmapped)")
    return out


# ----------------------------------------------------------------------------- import: config

@dataclass(frozen=True)
class ImportPlan:
    arch: Arch
    overrides: tuple            # dotted moetrain config keys (model.*, moe.*, train.seq_len)
    shared_scale: float = 1.0   # multiplies the shared expert's down projection
    has_shared: bool = False    # HF shared-expert tensors hold a real expert (not zeros)
    notes: tuple = field(default_factory=tuple)


# transformers 5.x defaults (models/*/configuration_*.py) of the optional keys import reads: a
# config.json that omits one means what transformers means. Shape keys without a default here are
# required (_int refuses their absence rather than guess a size).
HF_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, num_key_value_heads=None, max_position_embeddings=2048),
    "mixtral": dict(rms_norm_eps=1e-5, num_key_value_heads=8, max_position_embeddings=4096 * 32),
    "qwen2_moe": dict(rms_norm_eps=1e-6, num_key_value_heads=16, max_position_embeddings=32768,
                      decoder_sparse_step=1, norm_topk_prob=False),
    "glm4_moe": dict(rms_norm_eps=1e-5, num_key_value_heads=8, max_position_embeddings=131072,
                     n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                     routed_scaling_factor=1.0, norm_topk_prob=True),
}
_REQUIRED = object()


def _opt(hf: dict, key: str, default=_REQUIRED):
    """hf[key], else transformers' default for this model_type (or `default`)."""
    if key in hf:
        return hf[key]
    return HF_DEFAULTS.get(hf.get("model_type"), {}).get(key, default)


def _int(hf: dict, key: str, minimum: int = 1, default=_REQUIRED) -> int:
    """An integer config key >= minimum (transformers' default when absent), or one HFMapError line."""
    v = _opt(hf, key, default)
    if v is _REQUIRED:
        raise HFMapError(f"config.json has no {key}")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise HFMapError(f"config.json {key}={repr(v)[:60]}: must be an integer >= {minimum}")
    return v


def _num(hf: dict, key: str, default=_REQUIRED) -> float:
    """A positive finite number config key (transformers' default when absent), or one HFMapError line."""
    v = _opt(hf, key, default)
    if v is _REQUIRED:
        raise HFMapError(f"config.json has no {key}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
        raise HFMapError(f"config.json {key}={repr(v)[:60]}: must be a positive number")
    return float(v)


def _rope_theta(hf: dict) -> float:
    """RoPE base of an unscaled, whole-head RoPE (transformers 5 rope_parameters or 4's keys)."""
    rp = hf.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        raise HFMapError(f"config.json rope_parameters={repr(rp)[:60]}: must be an object")
    scaling = hf.get("rope_scaling")
    if scaling:
        raise HFMapError(f"rope_scaling={scaling} does not map: moetrain's RoPE is unscaled")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default":
        raise HFMapError(f"rope type {kind!r} (rope_parameters) does not map: moetrain's RoPE is unscaled")
    # Glm4Moe rotates half of each head unless its config says otherwise (transformers' default)
    default_prf = 0.5 if hf.get("model_type") == "glm4_moe" else 1.0
    prf = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_prf))
    if prf not in (None, 1, 1.0):
        raise HFMapError(f"partial_rotary_factor={prf} does not map: moetrain rotates the whole head")
    theta = rp.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise HFMapError("config.json has no rope_theta")
    return _num({"rope_theta": theta}, "rope_theta")


def hf_moe_layers(hf: dict) -> list[bool]:
    """Which layers of an HF config hold an MoE block."""
    n, mt = _int(hf, "num_hidden_layers"), hf["model_type"]
    if mt == "llama":
        return [False] * n
    if mt == "mixtral":
        return [True] * n
    if mt == "qwen2_moe":
        step, only = _int(hf, "decoder_sparse_step"), hf.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
            raise HFMapError(f"config.json mlp_only_layers={repr(only)[:60]}: must be a list of layer numbers")
        only, experts = set(only), _int(hf, "num_experts", 0)
        return [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(n)]
    k = _int(hf, "first_k_dense_replace", 0)
    return [i >= k for i in range(n)]


def _moe_rule(pattern: list[bool]) -> tuple[int, int]:
    """(moe.every, moe.first_dense_layers) that give this pattern of MoE layers (layer i is MoE
    when i >= first_dense_layers and (i+1) % every == 0; the fewest first dense layers), or HFMapError."""
    n = len(pattern)
    for first in range(n):
        for every in range(1, n + 1):
            if [i >= first and (i + 1) % every == 0 for i in range(n)] == pattern:
                return every, first
    moe = [i for i, x in enumerate(pattern) if x]
    raise HFMapError(f"MoE layers {moe} of {n} do not follow moetrain's pattern (layer i is MoE when "
                     "i >= moe.first_dense_layers and (i+1) % moe.every == 0)")


def _nonzero(t: torch.Tensor) -> bool:
    return t.numel() > 0 and bool(t.abs().max() > 0)


def plan_import(hf: dict, tensors: dict) -> ImportPlan:
    """An HF config.json (+ its tensors, for what the config cannot say: zero biases, zero gates)
    -> our config keys, or HFMapError naming what does not map."""
    mt = hf.get("model_type")
    if not isinstance(mt, str) or mt not in ARCHS:
        raise HFMapError(f"model_type {mt!r} is not one of {', '.join(ARCHS)}")
    arch = ARCHS[mt]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFMapError(f"hidden_act={act!r} does not map: moetrain's FFNs are SwiGLU (silu)")
    D, H, V, F = (_int(hf, key) for key in ("hidden_size", "num_attention_heads", "vocab_size", "intermediate_size"))
    n_layers = _int(hf, "num_hidden_layers")
    # a hostile num_hidden_layers must not build a huge layer pattern: it must match the weights
    held = {int(k.split(".")[2]) for k in tensors if re.match(r"model\.layers\.\d{1,9}\.", k)}
    if len(held) != n_layers or (held and max(held) != n_layers - 1):     # no set(range(n)): n may be huge
        raise HFMapError(f"config.json num_hidden_layers={n_layers} but the weights hold {len(held)} layers "
                         f"(model.layers.0 .. {max(held) if held else -1})")
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None or tuple(emb.shape) != (V, D):
        raise HFMapError(f"model.embed_tokens.weight is {None if emb is None else list(emb.shape)}, not "
                         f"[vocab_size={V}, hidden_size={D}] as config.json says")
    KV = _int(hf, "num_key_value_heads", default=None) if _opt(hf, "num_key_value_heads", None) is not None else H
    Dh = _int(hf, "head_dim") if hf.get("head_dim") is not None else D // H
    if Dh * H != D:
        raise HFMapError(f"head_dim={Dh} x {H} heads != hidden_size={D}: moetrain's attention has dim = heads x head_dim")
    if H % KV:
        raise HFMapError(f"num_key_value_heads={KV} does not divide num_attention_heads={H}")
    theta = _rope_theta(hf)
    seq = _int(hf, "max_position_embeddings")
    window = hf.get("sliding_window") if (mt != "qwen2_moe" or hf.get("use_sliding_window")) else None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise HFMapError(f"config.json sliding_window={repr(window)[:60]}: must be an integer or null")
    if window and window < seq:
        raise HFMapError(f"sliding_window={window} < max_position_embeddings={seq}: "
                         "moetrain's attention is full causal")
    biased = sorted(k for k, t in tensors.items() if k.endswith(".bias") and _nonzero(t))
    if biased:
        raise HFMapError(f"{biased[0]} is a nonzero bias ({len(biased)} in all): moetrain's projections have no "
                         "bias (zero biases import exactly)")
    if hf.get("use_qk_norm"):
        raise HFMapError("use_qk_norm: moetrain's attention has no q/k norm")
    ov = [f"model.vocab_size={V}", f"model.dim={D}", f"model.n_layers={n_layers}",
          f"model.n_heads={H}", f"model.max_seq_len={seq}", f"model.norm_eps={_num(hf, 'rms_norm_eps')}",
          f"model.rope_theta={theta}", f"model.tie_embeddings={str(bool(hf.get('tie_word_embeddings'))).lower()}",
          f"model.ffn_hidden={F}", f"train.seq_len={min(256, seq)}"]
    if hf.get("initializer_range"):
        ov.append(f"model.init_std={hf['initializer_range']}")
    notes = []
    if KV != H:
        ov.append(f"model.n_kv_heads={KV}")
        notes.append(f"grouped-query attention ({KV} K/V heads for {H} query heads): model.n_kv_heads={KV}")
    pattern = hf_moe_layers(hf)
    if not any(pattern):
        # dropless, so that upcycling the imported model (tools/upcycle.py) is exact by default
        return ImportPlan(arch, tuple(ov + ["moe.num_experts=0", "moe.capacity_factor=null"]), notes=tuple(notes))
    every, first_dense = _moe_rule(pattern)
    k = _int(hf, "num_experts_per_tok")
    has_shared, shared_scale = False, 1.0
    if mt == "mixtral":
        E, He, norm, Hs = _int(hf, "num_local_experts"), F, True, 0
    elif mt == "qwen2_moe":
        E, He, norm = _int(hf, "num_experts"), _int(hf, "moe_intermediate_size"), bool(_opt(hf, "norm_topk_prob"))
        Hs = _int(hf, "shared_expert_intermediate_size", 0)
        gates = [t for key, t in tensors.items() if key.endswith("mlp." + arch.shared_gate)]
        downs = [t for key, t in tensors.items() if key.endswith(f"mlp.{arch.shared}.down_proj.weight")]
        has_shared = any(_nonzero(t) for t in downs)
        if has_shared and any(_nonzero(t) for t in gates):
            raise HFMapError("shared_expert_gate is nonzero: the per-token sigmoid gate of Qwen2-MoE's shared expert "
                             "has no moetrain counterpart (ours is ungated; a zero gate imports exactly)")
        shared_scale = 1.0 / SHARED_GATE_SCALE
    else:
        E, He, norm = _int(hf, "n_routed_experts"), _int(hf, "moe_intermediate_size"), True
        Hs = He * _int(hf, "n_shared_experts", 0)
        if _opt(hf, "n_group") != 1 or _opt(hf, "topk_group") != 1:
            raise HFMapError(f"group-limited routing (n_group={_opt(hf, 'n_group')}, topk_group="
                             f"{_opt(hf, 'topk_group')}) does not map: moetrain's aux_free router picks among all experts")
        if _opt(hf, "routed_scaling_factor") != 1.0 or not _opt(hf, "norm_topk_prob"):
            raise HFMapError(f"routed_scaling_factor={_opt(hf, 'routed_scaling_factor')} / norm_topk_prob="
                             f"{_opt(hf, 'norm_topk_prob')}: moetrain's aux_free gates are the chosen scores summing to 1")
        downs = [t for key, t in tensors.items() if key.endswith(f"mlp.{arch.shared}.down_proj.weight")]
        has_shared = Hs > 0 and any(_nonzero(t) for t in downs)
    if k > E:
        raise HFMapError(f"num_experts_per_tok={k} > {E} experts")
    if k == 1 and norm and mt != "glm4_moe":
        raise HFMapError("top-1 routing with the gate renormalized to 1 does not map: moetrain's top-1 gate is the "
                         "raw softmax probability (Qwen2-MoE with norm_topk_prob=false maps)")
    router = "aux_free" if mt == "glm4_moe" else "topk"
    ov += [f"moe.num_experts={E}", f"moe.top_k={k}", f"moe.router={router}", "moe.capacity_factor=null",
           f"moe.expert_hidden={He}", "moe.expert_granularity=1", f"moe.every={every}",
           f"moe.first_dense_layers={first_dense}", f"moe.norm_topk_prob={str(norm).lower()}"]
    shared = 0
    if has_shared:
        if Hs % He:
            raise HFMapError(f"shared expert width {Hs} is not a multiple of the expert width {He}: moetrain's "
                             "shared experts are whole experts")
        shared = Hs // He
    ov.append(f"moe.shared_experts={shared}")
    if mt == "glm4_moe":
        ov.append("moe.aux_loss_coef=0.0")
    return ImportPlan(arch, tuple(ov), shared_scale, has_shared, tuple(notes))


# ----------------------------------------------------------------------------- import: tensors

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def from_hf_state(cfg: Config, plan: ImportPlan, hf_sd: dict) -> dict:
    """HF tensors (per-expert or fused expert names) -> our consolidated state dict for `cfg`.
    Every HF tensor must be used (zero biases and zero shared-expert placeholders count as used)."""
    m, arch = cfg.model, plan.arch
    Dh = m.head_dim
    hf_sd = unfuse_experts(hf_sd, arch)
    # biases: plan_import checked that they are zero
    used: set = {k for k in hf_sd if k.endswith(_IGNORED_SUFFIXES) or k.endswith(".bias")}

    def take(key: str) -> torch.Tensor:
        if key not in hf_sd:
            raise HFMapError(f"the HF checkpoint has no tensor {key}")
        used.add(key)
        return hf_sd[key]

    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    out["head.weight"] = out["embed.weight"] if m.tie_embeddings else take("lm_head.weight")
    if m.tie_embeddings:
        used.add("lm_head.weight")
    for i in range(m.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[p + "attn_norm.weight"] = take(q + "input_layernorm.weight")
        out[p + "ffn_norm.weight"] = take(q + "post_attention_layernorm.weight")
        out[p + "attn.wq.weight"] = from_hf_rope(take(q + "self_attn.q_proj.weight"), Dh)
        out[p + "attn.wk.weight"] = from_hf_rope(take(q + "self_attn.k_proj.weight"), Dh)
        out[p + "attn.wv.weight"] = take(q + "self_attn.v_proj.weight").contiguous()
        out[p + "attn.wo.weight"] = take(q + "self_attn.o_proj.weight")
        if not is_moe_layer(cfg, i):
            for ours, theirs in zip(("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
                out[p + f"ffn.{ours}.weight"] = take(q + f"mlp.{theirs}.weight")
            continue
        b = q + arch.moe_prefix + "."
        out[p + "ffn.router.weight"] = take(b + arch.router)
        if arch.score_bias:
            out[p + "ffn.router.expert_bias"] = take(b + arch.score_bias).float()
        E = cfg.moe.num_ffn_experts
        g, u, d = arch.expert_names
        out[p + "ffn.experts.w1"] = torch.stack([take(b + f"experts.{x}.{g}.weight").t() for x in range(E)])
        out[p + "ffn.experts.w3"] = torch.stack([take(b + f"experts.{x}.{u}.weight").t() for x in range(E)])
        out[p + "ffn.experts.w2"] = torch.stack([take(b + f"experts.{x}.{d}.weight").t() for x in range(E)])
        if arch.shared:
            s = b + arch.shared + "."
            w1, w3, w2 = (take(s + f"{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
            if arch.shared_gate:
                take(b + arch.shared_gate)
            if not plan.has_shared and _nonzero(w2):
                raise HFMapError(f"{s}down_proj.weight is nonzero but the config has no shared expert "
                                 "(n_shared_experts / shared_expert_intermediate_size): it would be dropped")
            if plan.has_shared:
                out[p + "ffn.shared.w1.weight"] = w1
                out[p + "ffn.shared.w3.weight"] = w3
                out[p + "ffn.shared.w2.weight"] = w2 * plan.shared_scale
    left = sorted(set(hf_sd) - used)
    if left:
        raise HFMapError(f"tensor {left[0]} has no place in moetrain's model ({len(left)} unmapped)")
    return {k: v.contiguous() for k, v in out.items()}


def unfuse_experts(hf_sd: dict, arch: Arch) -> dict:
    """transformers 5's in-memory layout (experts.gate_up_proj [E, 2He, D] = gate rows then up
    rows, experts.down_proj [E, D, He]) -> the per-expert names save_pretrained writes."""
    out = {}
    for key, t in hf_sd.items():
        head, sep, tail = key.rpartition(".experts.")
        if sep and tail in ("gate_up_proj", "down_proj") and t.dim() == 3:
            g, u, d = arch.expert_names
            prefix = head.replace(".mlp", f".{arch.moe_prefix}") if arch.moe_prefix != "mlp" else head
            for x in range(t.shape[0]):
                if tail == "gate_up_proj":
                    gate, up = t[x].chunk(2, dim=0)
                    out[f"{prefix}.experts.{x}.{g}.weight"] = gate
                    out[f"{prefix}.experts.{x}.{u}.weight"] = up
                else:
                    out[f"{prefix}.experts.{x}.{d}.weight"] = t[x]
            continue
        if arch.moe_prefix != "mlp" and ".mlp.gate." in key:
            key = key.replace(".mlp.gate.", f".{arch.moe_prefix}.gate.")
        out[key] = t
    return out
