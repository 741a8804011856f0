"""Model growth and merging as pure state-dict transforms, shared by tools/upcycle.py,
tools/depth_upscale.py and tools/ensemble_eval.py (which only read and write checkpoints).

State dicts here are CONSOLIDATED (world-1 names and shapes, experts stacked [N, ...]), as
moetrain.checkpoint.state.to_consolidated returns them and a world-1 Transformer loads them.

Sparse upcycling (Komatsuzaki et al. 2022), dense SwiGLU -> GroupedExperts
--------------------------------------------------------------------------
Dense FFN (nn.Linear layout): F(x) = W2 (silu(W1 x) * W3 x), W1, W3 [H, D], W2 [D, H].
Expert e (GroupedExperts layout): F_e(x) = (silu(x w1[e]) * (x w3[e])) w2[e], w1/w3 [D, He],
w2 [He, D]. SwiGLU is a sum over hidden units, so with the hidden dim cut into r = H / He
contiguous slices S_0..S_{r-1}:  F(x) = sum_j F_j(x),  F_j = W2[:, S_j] (silu(W1[S_j] x) * W3[S_j] x).

    expert e  <-  slice j = e mod r:   w1[e] = W1[S_j]^T,  w3[e] = W3[S_j]^T,  w2[e] = s * W2[:, S_j]^T

r = 1 is the classic upcycling (every expert a full copy, moe.expert_hidden = ffn_hidden);
r > 1 covers the default expert size ffn_hidden // top_k and DeepSeek fine-grained experts
(moe.expert_granularity m): each expert is a slice, N = num_experts * m experts, K = top_k * m
choices per token. The MoE output is y = sum_{k<K} g_k s F_{j(k)}(x), g = the token's gates.

Two router initializations make y = F(x) exactly at step 0. Call the r experts c*r .. c*r+r-1
(slices 0..r-1) "group c"; each group holds the whole dense FFN.

  grouped  (the gates of every token sum to 1: router topk with norm_topk_prob and K > 1,
           gshard, noisy_topk, aux_free): expert e's router row = row c*r of the router's fresh
           random init, c = e // r, so the r members of a group have equal logits. The stable
           top-K (ties toward the lower id) then takes whole groups, the best K/r of them (needs
           K % r == 0), and all members of a group get the same gate g_c. Gates summing to 1 mean
           sum_c r g_c = 1, so y = s sum_c g_c sum_j F_j(x) = (s / r) F(x), and s = r. Exact for ANY
           router values, so the router stays random across groups (tokens spread over the groups
           from step 0 on); r = 1 (experts = full copies) is classic upcycling with s = 1.
  zero     (otherwise: top-1 topk/switch, whose gate is the raw softmax probability, or
           norm_topk_prob off): router weights 0 -> every logit 0 -> all N probabilities exactly
           1/N -> the stable top-K picks experts 0..K-1, which hold every slice K/r times. Each
           gate is g = 1/K (renormalized) or 1/N (raw), so y = g (K/r) s F(x) and
                 s = r / (g K)  =  r            (renormalized gates)
                                =  r N / K      (raw probabilities; top-1 Switch, r = 1: s = N)
           The router learns from step 1 on (raw-prob gates and the balance loss give it
           gradients); while rows stay equal, ties still send tokens to the lowest ids.

The scale lives in w2 (an expert's output is linear in w2). The grouped init relies on equal
router rows giving bit-equal logits, which holds for matmul kernels that reduce every output
column in the same order (the CPU and cuBLAS kernels we know); tests/test_growth.py checks the
outcome end to end. Training breaks the ties from step 1 on, as the members' slices differ.

Exactness holds for the forward pass without dropped copies: use moe.capacity_factor=null (with
the zero router every token goes to experts 0..K-1 at step 0, which a capacity cuts hard).
Training-time randomness changes the first training step but not the eval loss: noisy_topk's
noise and router jitter break the ties (gshard's random second expert does not: inside a group
2 * g2 = 1 > u). Optional relative noise: w += noise * std(w) * N(0, 1), drawn per expert from
a generator keyed by (seed, tensor name, global expert id), so the result is reproducible.

Depth up-scaling (SOLAR, Kim et al. 2023): layers [0, n-m) followed by copies of [m, n)
-> 2(n-m) layers; new layer n-m+j is old layer m+j.

Ensembles: p_ens = mean_m softmax(logits_m); by convexity of -log, each token's ensemble loss is
at most the mean of the members' losses, so the ensemble's mean loss is too.

Shape legend: N experts, D dim, H dense hidden, He expert hidden, V vocab, T tokens.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from moetrain.config import Config, load_config, to_dict
from moetrain.config import is_moe_layer as config_is_moe_layer
from moetrain.model.transformer import Transformer
from moetrain.moe.router import ROUTERS

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_DENSE_FFN = ("ffn.w1.weight", "ffn.w3.weight", "ffn.w2.weight")


class GrowthError(ValueError):
    """One line: what cannot be grown (or merged) and why."""


# ----------------------------------------------------------------------------- configs


def _known(schema_cls, d: dict) -> dict:
    """Keep only the keys the config schema knows (a checkpoint from another version may differ)."""
    out = {}
    names = {f.name: f for f in dataclasses.fields(schema_cls)}
    for k, v in d.items():
        if k not in names:
            continue
        f = names[k]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        out[k] = _known(type(sub), v) if dataclasses.is_dataclass(sub) and isinstance(v, dict) else v
    return out


def config_from_dict(d: Optional[dict], overrides: Iterable[str] = ()) -> Config:
    """A checkpoint manifest's `config` (+ dotted overrides) -> validated Config, through
    load_config so overrides are checked exactly as the training CLI checks them."""
    if not d:
        raise GrowthError("the checkpoint's manifest.json has no 'config' to build the model from")
    from omegaconf import OmegaConf
    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="moetrain-growth-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.create(_known(Config, d))))
        return load_config(path, list(overrides))
    finally:
        os.remove(path)


is_moe_layer = config_is_moe_layer      # the one rule (moetrain.config.is_moe_layer), under its old name here


def build_model(cfg: Config, state: Optional[dict] = None, seed: Optional[int] = None) -> Transformer:
    """World-1 model: loads `state` (strict) if given, else the fresh init of `seed`
    (default train.seed). Returned in eval mode."""
    model = Transformer(cfg)
    if state is None:
        model.init_weights(cfg.train.seed if seed is None else seed)
    else:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:     # size mismatches: the state is of another shape of model
            lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
            raise GrowthError(f"state dict does not fit the model: {(lines or [str(exc)])[0][:300]}") from None
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise GrowthError(f"state dict does not fit the model ({what}; {len(missing)} missing, "
                              f"{len(unexpected)} unexpected)")
    return model.eval()


def fresh_state(cfg: Config, seed: Optional[int] = None) -> dict:
    """The world-1 state dict of a freshly initialized model (detached copies)."""
    return {k: v.detach().clone() for k, v in build_model(cfg, seed=seed).state_dict().items()}


def checkpoint_record(cfg: Config, state: dict, step: int = 0, tokens_seen: int = 0, **extra) -> dict:
    """A consolidated checkpoint (ckpt.state.to_consolidated's form) holding only a model: no
    optimizer state (the optimizer starts fresh on resume), no RNG states. The manifest fields
    mirror what training writes (checkpoint.Checkpointer._manifest_fields)."""
    from moetrain.checkpoint import state as S
    model = Transformer(cfg)
    manifest = {"tokens_seen": tokens_seen, "world": 1, "layout": {"dp": 1, "tp": 1, "ep": 1},
                "num_experts": cfg.moe.num_experts, "expert_tensors": S.expert_tensor_names(model),
                "buffers": S.buffer_names(model), "async_save": False, "torch_version": torch.__version__,
                "config": to_dict(cfg), **extra}
    return {"model": {k: v.contiguous() for k, v in state.items()}, "optim": {},
            "train": {"step": step, "tokens_seen": tokens_seen}, "rng": {}, "manifest": manifest}


# ----------------------------------------------------------------------------- upcycling


@dataclass(frozen=True)
class UpcyclePlan:
    """How every upcycled layer is built (see the module docstring for the algebra)."""
    num_experts: int          # N: FFN experts built (moe.num_experts * moe.expert_granularity)
    top_k: int                # K: choices per token (moe.top_k * moe.expert_granularity)
    slices: int               # r = dense hidden / expert hidden
    expert_hidden: int        # He
    router: str               # grouped | zero
    w2_scale: float           # s
    exact: bool               # the eval forward equals the dense model's (dropless, no noise)
    noise: float = 0.0
    seed: int = 0
    notes: tuple = field(default_factory=tuple)


def plan_upcycle(dense_cfg: Config, moe_cfg: Config, noise: float = 0.0, router: str = "auto",
                 seed: Optional[int] = None) -> UpcyclePlan:
    """Check that moe_cfg can be upcycled from dense_cfg and choose the router init and scale.
    Raises GrowthError (one line) when it cannot."""
    _check_upcycle_target(dense_cfg, moe_cfg, noise, router)
    e, H, He = moe_cfg.moe, moe_cfg.model.ffn_hidden, moe_cfg.expert_hidden
    N, K, r = moe_cfg.num_ffn_experts, moe_cfg.routed_top_k, H // He
    router, scale, note = _router_init(moe_cfg, router, N, K, r)
    notes = [note]
    exact = e.capacity_factor is None and noise == 0
    if e.capacity_factor is not None:
        notes.append(f"warning: moe.capacity_factor={e.capacity_factor}: dropped copies break step-0 equivalence"
                     + (" (the zero router sends every token to the same K experts at step 0)" if router == "zero" else "")
                     + "; moe.capacity_factor=null is exact")
    if noise > 0:
        notes.append(f"noise {noise} (relative) added to every expert: step 0 is close to, not equal to, the dense model")
    return UpcyclePlan(N, K, r, He, router, scale, exact, noise,
                       moe_cfg.train.seed if seed is None else seed, tuple(notes))


def _check_upcycle_target(dense_cfg: Config, moe_cfg: Config, noise: float, router: str) -> None:
    e, m = moe_cfg.moe, moe_cfg.model
    if e.num_experts <= 0:
        raise GrowthError("the target config is dense (moe.num_experts=0): set moe.num_experts=N to upcycle")
    if e.layer != "moe":
        raise GrowthError(f"moe.layer={e.layer!r}: upcycling builds routed FFN experts, use moe.layer=moe")
    if not ROUTERS[e.router].token_choice:
        raise GrowthError(f"moe.router={e.router!r} is not allowed for upcycling: a token may be taken by 0..N "
                          "experts, so no init reproduces the dense output; use a token-choice router")
    if e.num_zero_experts > 0:
        raise GrowthError(f"moe.zero_experts={e.num_zero_experts} experts are not allowed for upcycling: "
                          "tokens routed to them would lose the dense FFN output; set them to 0")
    if e.shared_experts > 0:
        raise GrowthError(f"moe.shared_experts={e.shared_experts} is not supported by upcycling yet: set it to 0")
    if router not in ("auto", "grouped", "zero"):
        raise GrowthError(f"router init {router!r} is not one of auto, grouped, zero")
    if noise < 0 or not math.isfinite(noise):
        raise GrowthError(f"noise={noise!r} must be a finite number >= 0")
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden", "tie_embeddings"):
        a, b = getattr(dense_cfg.model, key), getattr(m, key)
        if a != b:
            raise GrowthError(f"model.{key}={b!r} in the target config but {a!r} in the dense checkpoint: "
                              "upcycling keeps the model shape")
    H, He, K = m.ffn_hidden, moe_cfg.expert_hidden, moe_cfg.routed_top_k
    if He > H or H % He:
        raise GrowthError(f"expert hidden size {He} (moe.expert_hidden / moe.expert_granularity) must divide the "
                          f"dense model.ffn_hidden={H}: experts are copies (= {H}) or equal slices of the dense FFN")
    if K % (H // He):
        raise GrowthError(f"{K} choices per token (moe.top_k x moe.expert_granularity) cannot cover the dense FFN "
                          f"cut into {H // He} slices of {He}: set moe.expert_hidden so that {H} / expert hidden "
                          f"divides {K}, e.g. moe.expert_hidden={H}")


def _router_init(moe_cfg: Config, router: str, N: int, K: int, r: int) -> tuple[str, float, str]:
    """(router init, w2 scale, note) for N experts of r slices, K choices (module docstring)."""
    e, H, He = moe_cfg.moe, moe_cfg.model.ffn_hidden, moe_cfg.expert_hidden
    normalized = ROUTERS[e.router].gates_sum_to_one(e)     # identical experts then give the dense output
    if router == "auto":
        router = "grouped" if normalized else "zero"
    if router == "grouped":
        if not normalized:
            raise GrowthError(f"router init 'grouped' needs gates that sum to 1 (moe.router={e.router!r}, "
                              f"top-{K}, norm_topk_prob={e.norm_topk_prob}): use --router zero or auto")
        if N % r:
            raise GrowthError(f"{N} experts do not form whole groups of {r} slices (dense hidden {H} / expert hidden "
                              f"{He}): choose moe.num_experts x moe.expert_granularity as a multiple of {r}")
        return router, float(r), (("router keeps its fresh random init" if r == 1 else
                                   f"router rows shared by each group of {r} slice experts (fresh random init)")
                                  + f": every token takes {K // r} whole group{'s' if K // r > 1 else ''} with gates "
                                  "summing to 1" + (f"; w2 scaled by r = {r}" if r > 1 else ""))
    gate = 1.0 / K if normalized else 1.0 / N
    scale = r / (gate * K)
    why = f"1/K = 1/{K} (renormalized)" if normalized else f"1/N = 1/{N} (raw softmax probability)"
    picks = "expert 0" if K == 1 else f"experts 0..{K - 1}"
    return router, scale, (f"router weights zero: every token picks {picks} at step 0 (ties break toward the lower "
                           f"id), each gate {why}; w2 scaled by r/(gK) = {scale:g}")


def _keyed_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))


def upcycle_ffn(w1_HD: torch.Tensor, w3_HD: torch.Tensor, w2_DH: torch.Tensor, plan: UpcyclePlan,
                name: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dense SwiGLU -> GroupedExperts tensors (w1, w3 [N, D, He], w2 [N, He, D]): expert e is
    slice e mod r of the hidden dim, w2 scaled by plan.w2_scale, plus optional relative noise
    (generator keyed by plan.seed, `name` and the global expert id)."""
    He, r = plan.expert_hidden, plan.slices
    if w1_HD.shape[0] != He * r:
        raise GrowthError(f"{name}: dense hidden size {w1_HD.shape[0]} != {r} slices x {He}")
    out = []
    for tag, w, hidden_dim, scale in (("w1", w1_HD, 0, 1.0), ("w3", w3_HD, 0, 1.0), ("w2", w2_DH, 1, plan.w2_scale)):
        std = float(w.float().std()) if plan.noise > 0 else 0.0
        experts = []
        for g in range(plan.num_experts):
            j = g % r
            piece = w.narrow(hidden_dim, j * He, He).t() * scale      # [D, He] or [He, D]
            if plan.noise > 0:
                gen = _keyed_generator(plan.seed, f"upcycle:{name}.experts.{tag}[{g}]")
                piece = piece + plan.noise * std * abs(scale) * torch.randn(piece.shape, generator=gen, dtype=piece.dtype)
            experts.append(piece.contiguous())
        out.append(torch.stack(experts))
    return out[0], out[1], out[2]


def init_router_tensor(name: str, fresh: torch.Tensor, plan: UpcyclePlan) -> torch.Tensor:
    """Gate weights [N, D] and the gated-residual projection [N, N] decide the logits: zeroed
    ('zero') or with each expert's row copied from its group leader c*r ('grouped'). Anything
    else (noisy_topk's noise weights, aux-free biases) keeps its fresh init."""
    if name not in ("weight", "residual_weight"):
        return fresh.clone()
    if plan.router == "zero":
        return torch.zeros_like(fresh)
    leaders = (torch.arange(fresh.shape[0]) // plan.slices) * plan.slices
    return fresh[leaders].clone()


def upcycle_state_dict(dense_sd: dict, dense_cfg: Config, moe_cfg: Config, plan: UpcyclePlan,
                       fresh_sd: Optional[dict] = None) -> dict:
    """Dense (consolidated) state dict -> the MoE model's. Layers that are MoE in moe_cfg and a
    dense SwiGLU in dense_cfg are upcycled; every other tensor is copied (shapes checked). Router
    parameters come from `fresh_sd` (the target's fresh init; built when None): the gate rows
    shared within each group of plan.slices experts ('grouped'), or zero ('zero')."""
    fresh_sd = fresh_state(moe_cfg, seed=plan.seed) if fresh_sd is None else fresh_sd
    out: dict = {}
    used = set()
    for key, fresh in fresh_sd.items():
        m = _LAYER_RE.match(key)
        layer = int(m.group(1)) if m else None
        upcycled = layer is not None and is_moe_layer(moe_cfg, layer) and not is_moe_layer(dense_cfg, layer)
        if upcycled and m.group(2).startswith("ffn."):
            rest = m.group(2)[len("ffn."):]
            if rest in ("experts.w1", "experts.w3", "experts.w2"):
                dense_keys = [f"layers.{layer}.{k}" for k in _DENSE_FFN]
                for dk in dense_keys:
                    if dk not in dense_sd:
                        raise GrowthError(f"the dense checkpoint has no {dk} to upcycle layer {layer} from")
                if f"layers.{layer}.ffn.experts.w1" not in out:
                    w1, w3, w2 = upcycle_ffn(*(dense_sd[k] for k in dense_keys), plan, f"layers.{layer}.ffn")
                    out.update({f"layers.{layer}.ffn.experts.w1": w1, f"layers.{layer}.ffn.experts.w3": w3,
                                f"layers.{layer}.ffn.experts.w2": w2})
                    used.update(dense_keys)
                continue
            if rest.startswith("router."):
                out[key] = init_router_tensor(rest[len("router."):], fresh, plan)
                continue
            raise GrowthError(f"cannot upcycle {key}: not an expert or router tensor")
        if key not in dense_sd:
            raise GrowthError(f"the dense checkpoint has no tensor {key} (shape {list(fresh.shape)})")
        src = dense_sd[key]
        if tuple(src.shape) != tuple(fresh.shape):
            raise GrowthError(f"tensor {key} has shape {list(src.shape)} in the dense checkpoint but "
                              f"{list(fresh.shape)} in the target model")
        out[key] = src.clone().to(fresh.dtype)
        used.add(key)
    left = sorted(set(dense_sd) - used)
    if left:
        raise GrowthError(f"the dense checkpoint's tensor {left[0]} has no place in the target model "
                          f"({len(left)} unused)")
    return out


# ----------------------------------------------------------------------------- depth up-scaling


def depth_plan(n_layers: int, drop: int) -> list[int]:
    """Source layer of each new layer: [0, n-m) then [m, n)."""
    if not 0 <= drop < n_layers:
        raise GrowthError(f"--drop {drop} must be in 0..{n_layers - 1} (the checkpoint has {n_layers} layers)")
    keep = n_layers - drop
    return list(range(keep)) + list(range(drop, n_layers))


def check_depth_moe_pattern(src_cfg: Config, dst_cfg: Config, sources: list[int]) -> None:
    """Every new layer must be MoE exactly where its source layer is (moe.every pattern)."""
    for i, s in enumerate(sources):
        if is_moe_layer(dst_cfg, i) != is_moe_layer(src_cfg, s):
            kind = "an MoE" if is_moe_layer(src_cfg, s) else "a dense"
            first = dst_cfg.moe.first_dense_layers
            rule = f"moe.every={dst_cfg.moe.every}" + (f" and moe.first_dense_layers={first}" if first else "")
            raise GrowthError(f"new layer {i} would be a copy of layer {s}, {kind} layer, but {rule} "
                              f"make{'' if first else 's'} layer {i} {'MoE' if is_moe_layer(dst_cfg, i) else 'dense'}: "
                              f"choose --drop so that n - 2*drop is a multiple of moe.every"
                              + (" (the copied layers must not start among the first dense ones)" if first else ""))


def depth_upscale_state_dict(sd: dict, sources: list[int]) -> dict:
    """Renumber layers: new layer i <- old layer sources[i] (tensors cloned); the rest copied."""
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    out: dict = {}
    for key, t in sd.items():
        m = _LAYER_RE.match(key)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            out[key] = t.clone()
    for i, s in enumerate(sources):
        if s not in by_layer:
            raise GrowthError(f"the checkpoint has no layer {s}")
        for rest, t in by_layer[s].items():
            out[f"layers.{i}.{rest}"] = t.clone()
    return out


# ----------------------------------------------------------------------------- ensembles


@torch.no_grad()
def ensemble_losses(models: list, batches: Iterable[torch.Tensor], micro_batch_size: int,
                    device: Optional[torch.device] = None) -> tuple[list[float], float]:
    """Mean next-token CE (nats/token) of each model and of the ensemble that averages their
    output probabilities, over the same windows. Each model's loss is computed as
    Trainer.evaluate computes it (fp32 CE summed, divided by the token count)."""
    sums = torch.zeros(len(models) + 1, dtype=torch.float64, device=device or "cpu")   # read once, at the end
    count = 0
    for batch in batches:
        for lo in range(0, batch.shape[0], micro_batch_size):
            rows = batch[lo:lo + micro_batch_size].to(device or "cpu")
            inp, tgt = rows[:, :-1], rows[:, 1:].reshape(-1)
            logps = []
            for i, model in enumerate(models):
                logits = model(inp)[0].float().reshape(-1, model.cfg.model.vocab_size)
                sums[i] += F.cross_entropy(logits, tgt, reduction="sum")
                logps.append(torch.log_softmax(logits, dim=-1))
            ens = torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(models))
            sums[-1] += F.nll_loss(ens, tgt, reduction="sum")
            count += tgt.numel()
    means = (sums / max(1, count)).cpu().tolist()
    return means[:-1], means[-1]
