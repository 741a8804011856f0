"""Memory and communication model of a moetrain run: pure functions of a Config and a Layout.

Nothing here builds a model, touches torch.distributed or allocates tensors; every number follows
from the config, the layout and (for the exact all-to-all count) the routing counts a run logged.

Notation: P parameters, D model.dim, V vocab, Hh heads, H the routed-expert hidden size
(Config.expert_hidden), E FFN experts (moe.num_ffn_experts), K routed top-k (moe.routed_top_k),
L = E/ep local experts, b micro batch (sequences per rank per micro-step), s seq_len, T = b*s
tokens per micro-step per rank, m micro-steps per optimizer step = global_batch/(dp*b),
w = dtype bytes: fp32 4, bf16 2. Bytes are bytes; MiB = 2**20 bytes.

1. Parameters (`param_specs`): one ParamSpec per tensor of the world-1 Transformer, named and
   shaped exactly as `model.named_parameters()` (a test checks it). Each says whether it is an
   expert parameter (GroupedExperts w1/w3/w2 [E, D, H]/[E, H, D]; PEER expert_down/up [N, D]) and
   which dim tensor parallelism shards (model/tp_plan.py):
     embed.weight [V, D] Shard(0) (RowwiseParallel on an embedding = vocab rows); head.weight
     [V, D] Shard(0) (ColwiseParallel); attention wq [D, D] and wk/wv [Hkv*Dh, D] (grouped-query
     attention: Hkv = model.n_kv_heads) Shard(0), wo Shard(1); dense
     SwiGLU and shared experts w1/w3 [h, D] Shard(0), w2 [D, h] Shard(1); with parallel.etp the
     routed experts' w1/w3 Shard(2), w2 Shard(1); everything else (norms, routers, MoE++
     constants, PEER query/keys/tables) replicated over tp. A tied head is the embedding.
   Per rank (`local_params`): numel / tp on the TP dim; expert params / ep (dim 0: experts or
   PEER rows, parallel/apply.apply_ep; (E + R) / ep slots under moe.placement=balanced with R
   redundant replicas); under FSDP (parallel.fsdp, dp > 1) a further / dp (dense)
   or / edp (experts) on the dim parallel/fsdp.fsdp_shard_dim picks (the first dim, not the TP dim
   and not an expert's dim 0, that the group size divides, judged on the TP-global, EP-local
   shape); a parameter with no such dim, and PEER tables, stay whole (FSDP ignores them).
   Groups (parallel/mesh.py): dp = world/tp, edp = dp/ep; dense gradients are summed over dp,
   expert gradients over edp; TP adds no gradient reduction (parallel/grads.py).

2. Training state per rank (`state_bytes`), the three numbers tools/bench_memory.py measures:
   weights, gradients and AdamW state are fp32 whatever train.precision says (bf16 is autocast:
   fp32 master weights ARE the parameters, no second copy). Let p = local parameter elements.
     native   params 4p, grads 4p, optim 8p (exp_avg, exp_avg_sq) + 4 bytes per tensor (the
              0-dim fp32 `step` of torch's AdamW)
     fsdp     the same of the FSDP shards (gradients are reduce-scattered into the shard)
     zero1/2  (train.engine=deepspeed, DeepSpeed 0.19 stage_1_and_2.py; tp = 1): the model's
              own fp32 parameters (4p) PLUS the fp32 partition ZeRO updates (4q, a copy also for
              fp32 training), optim 8q; q = sum over DeepSpeed's param groups ({decay, no decay}
              x {dense, expert}) of ceil(n_g / (2 w_g)) * 2, w_g = dp (dense) or edp (experts),
              n_g the group's local elements (the flat buffer padded to 2 w_g elements).
              grads: zero2 4q (the gradient partition; DeepSpeed's grads_in_partition holds whole
              parameters that straddle a partition boundary, so the measurement is up to ~1-2%
              above); zero1 8p (the whole gradients accumulated until the boundary plus the
              reduction bucket of min(5e8, p) fp32 elements, as measured on DeepSpeed 0.19.8).
   Transient, not in those three (reported apart): FSDP's all-gathered unsharded parameters of
   the largest unit (param dtype), twice for the backward prefetch of the next unit; under bf16
   autocast the bf16 copies of the weights a forward casts and keeps for backward, 2 bytes per
   local matrix element (`weight_copy_bytes`: not norms, routers (fp32) or an untied embedding
   (a lookup); 0 when FSDP gathers bf16 weights or compute is fp32).

3. Activations per micro-step (`activation_bytes`): the bytes of the distinct tensors autograd
   saves for backward in one forward, with no activation checkpointing (moetrain has none today).
   Residual stream, norms, router and loss in fp32 (4 bytes); matmul inputs/outputs in the
   compute dtype c (4 on CPU, 2 under bf16 autocast); TP-sharded ones / tp. Per layer:
     norm       2*T*D*4 + T*4 (residual input, x*rsqrt, rsqrt)
     in(n)      the normalized input of n matmuls: T*D*4 in fp32 (one tensor), n*T*D*2 under
                bf16 autocast (each matmul saves its own cast: autocast caches weight casts only)
     attention  norm + in(3) + (3*D + 2*Hkv*Dh)*T*c/tp (rotated q, rotated k and v at the K/V
                heads' width, the attention output, wo's input)
                + T*Hh/tp*4 (the attention logsumexp)
     dense FFN  norm + in(2) + 4*T*h*c/tp (w1 out, w3 out, silu out, product), h = ffn_hidden
     MoE        norm + router T*D*4 + 2*T*E*4 + T*K*12 + 3*T*4 (fp32 input, logits,
                probabilities, top-k ids and gates, normalizers); N_s*(2*8 + 4) (token and copy
                ids, gate weights); experts N_r*D*c + 2*N_r*H*c (moe/grouped_swiglu.py saves its
                input and the w1 and w3 outputs); combine N_s*D*8 (returned rows in fp32 and
                their weighted copy); with ep > 1 2*N_r*8 (regroup permutations); shared experts
                4*T*h_s*c/tp (+ in(2) under bf16)
     PEER       norm + in(1) + 2*T*q*4 + T*hk*36 (query, top-k ids and weights; q =
                heads*key_dim, hk = heads*top_k) + 2*T*N_local*4 + T*hk*13 when moe/peer.py
                scores all N_local rows with one GEMM (N_local <= 32*hk), else 2*T*hk*D*4 +
                T*hk*13 (gathered rows; not validated)
     head       norm + in(1) + T*V/tp*4 (log-softmax) + 2*T*8 (input and target ids)
   Not counted here: the bf16 weight copies (`weight_copy_bytes`, doc 2), temporaries of the
   backward itself, the allocator's slack. tests/test_plan.py checks the formula against the
   storages autograd saves in world-1 forwards, fp32 and CPU bf16 autocast (within 0.5% for FFN
   experts, dropless; with a capacity N_s and N_r are the bounds, above what a run keeps). Not
   checked: TP/EP shards of activations (the /tp terms and the ep permutations) and PEER's
   gathered-row path.

4. All-to-all (moe/dispatch.AllToAllDispatcher, parallel/comm.py), per routed MoE layer and
   micro-step, on a rank that sends N_s rows (its kept copies to FFN experts, those for its own
   experts included: all_to_all_single sends the whole buffer) and receives N_r rows (copies its
   experts process), payload in the compute dtype c:
     sent = dispatch N_s*D*c + combine N_r*D*c + dispatch_bwd N_r*D*c + combine_bwd N_s*D*c
   received = the same total (the roles swap). This is what metrics' `ranks.a2a_mb` counts (the
   byte size of each send buffer; the small int64 count exchange, E*8 bytes per layer and
   micro-step, is timed but not counted, reported here as `counts_bytes`). Off-rank bytes exclude
   the share a rank sends to itself (uniform routing: (ep-1)/ep of it). Dropless: N_s = T*K (fewer
   when zero-computation experts are picked); balanced N_r = N_s; a stated `skew` (max rank load /
   mean) multiplies N_r on the busiest rank. Capacity factor cf: C = max(min_capacity,
   ceil(cf*K*T/E)) per expert and source rank, N_s <= min(T*K, E*C), N_r <= ep*L*C. Under TP every
   TP rank does the same exchange in its own EP group. PEER (RowShardDispatcher) all-gathers
   instead: not modelled here.

5. Gradient reduction per step (`grad_sync_bytes`), per rank, as the collective's buffer size and
   the ring traffic each rank sends (all-reduce 2(n-1)/n, reduce-scatter and all-gather (n-1)/n of
   the buffer): native: all-reduce of the local dense fp32 gradients over dp and of the expert ones
   over edp, once per step. FSDP: per micro-step, all-gather of the unsharded parameters in the
   FSDP param dtype twice (forward, backward: reshard_after_forward) and reduce-scatter of the
   gradients in the reduce dtype; ignored params all-reduced once per step. ZeRO-1: reduce-scatter
   of the fp32 gradients once per step; ZeRO-2: once per micro-step; both all-gather the updated
   fp32 partitions once per step.

6. TP collectives per micro-step (`tp_bytes`), per rank, activations in c (Megatron without
   sequence parallelism; model/tp_plan.py): one all-reduce of T*D forward and one backward per
   attention block, per dense FFN and per MoE layer with shared experts; the vocab-parallel
   embedding's forward all-reduce T*D and the head's backward all-reduce T*D; loss_parallel's
   three all-reduces of T fp32 values; with etp two all-reduces of N_r*D per MoE layer.

7. Step time for the planner (`step_time`, tools/plan_layout.py): compute = the rank's FLOPs
   (`flops_split`: 6 x active parameters + causal attention; dense / tp, experts x skew, / tp only
   with etp) at bf16 peak x compute_efficiency; all-to-all = off-rank bytes over the ep-1 peers,
   on-node ones at the NVLink rate and the rest at the network rate; collectives = ring wire bytes
   at the slowest link of their group. No overlap of communication with compute is assumed.
   Optional fixed costs for hosts where per-op overheads dominate (CPU; 0 in the GPU presets,
   measured by tools/calibrate_hardware.py): per layer and micro-step, per local parameter for
   the optimizer, per collective call; and per-node-occupancy figures (`by_local_ranks`: ranks
   sharing a CPU's cores each get a share of them).
   Placement follows parallel/mesh.py: rank = (edp_idx*ep + ep_idx)*tp + tp_idx, nodes of
   gpus_per_node consecutive ranks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from moetrain.config import is_moe_layer

MIB = 2 ** 20
DS_BUCKET = 500_000_000          # train/ds_engine.DS_BUCKET: DeepSpeed reduce bucket (elements)
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2}
MODES = ("native", "fsdp", "zero1", "zero2")


# --------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the world-1 model: name and global shape as model.named_parameters()
    gives them; expert: sharded over ep (dim 0) and synced over edp; tp_dim: the dim TP shards
    (None = replicated over tp; etp decides for routed experts); fsdp_ok: FSDP may shard it."""
    name: str
    shape: tuple
    expert: bool = False
    tp_dim: Optional[int] = None
    etp_dim: Optional[int] = None     # routed experts under parallel.etp
    fsdp_ok: bool = True              # False: PEER tables (FSDP's ignored_params)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decay(self) -> bool:          # train/optim.decay_groups: matrices decay
        return len(self.shape) >= 2


def _swiglu(prefix: str, dim: int, hidden: int) -> list[ParamSpec]:
    return [ParamSpec(f"{prefix}.w1.weight", (hidden, dim), tp_dim=0),
            ParamSpec(f"{prefix}.w3.weight", (hidden, dim), tp_dim=0),
            ParamSpec(f"{prefix}.w2.weight", (dim, hidden), tp_dim=1)]


def _router_has_noise(router: str) -> bool:
    from moetrain.moe.router import ROUTERS      # the registry says which routers own noise weights
    return ROUTERS[router].noise


def param_specs(cfg) -> list[ParamSpec]:
    """Every parameter of Transformer(cfg) at world 1, in registration order (see module doc 1)."""
    m, e = cfg.model, cfg.moe
    D = m.dim
    out = [ParamSpec("embed.weight", (m.vocab_size, D), tp_dim=0)]
    for i in range(m.n_layers):
        p = f"layers.{i}"
        out.append(ParamSpec(f"{p}.attn_norm.weight", (D,)))
        kv = m.kv_heads * m.head_dim                     # grouped-query attention: K/V heads only
        out.append(ParamSpec(f"{p}.attn.wq.weight", (D, D), tp_dim=0))
        out += [ParamSpec(f"{p}.attn.{n}.weight", (kv, D), tp_dim=0) for n in ("wk", "wv")]
        out.append(ParamSpec(f"{p}.attn.wo.weight", (D, D), tp_dim=1))
        out.append(ParamSpec(f"{p}.ffn_norm.weight", (D,)))
        if not is_moe_layer(cfg, i):
            out += _swiglu(f"{p}.ffn", D, m.ffn_hidden)
        elif e.layer == "peer":
            pc = e.peer
            n_exp, q = pc.num_keys ** 2, pc.heads * pc.key_dim
            # the layer's own parameters first, then its children's (named_parameters order)
            out += [ParamSpec(f"{p}.ffn.keys{j}", (pc.heads, pc.num_keys, pc.key_dim // 2)) for j in (1, 2)]
            out += [ParamSpec(f"{p}.ffn.expert_{n}", (n_exp, D), expert=True, fsdp_ok=False) for n in ("down", "up")]
            out.append(ParamSpec(f"{p}.ffn.query.weight", (q, D)))
            if pc.query_bn:
                out += [ParamSpec(f"{p}.ffn.query_bn.weight", (q,)), ParamSpec(f"{p}.ffn.query_bn.bias", (q,))]
        else:
            Et, F, H = e.num_router_outputs, e.num_ffn_experts, cfg.expert_hidden
            if e.zero_experts.constant > 0:     # the layer's own parameters come before its children's
                c = e.zero_experts.constant
                out += [ParamSpec(f"{p}.ffn.const_w", (c, 2, D)), ParamSpec(f"{p}.ffn.const_v", (c, D))]
            out.append(ParamSpec(f"{p}.ffn.router.weight", (Et, D)))
            if _router_has_noise(e.router):
                out.append(ParamSpec(f"{p}.ffn.router.noise_weight", (Et, D)))
            if e.gated_residual:
                out.append(ParamSpec(f"{p}.ffn.router.residual_weight", (Et, Et)))
            out += [ParamSpec(f"{p}.ffn.experts.w1", (F, D, H), expert=True, etp_dim=2),
                    ParamSpec(f"{p}.ffn.experts.w3", (F, D, H), expert=True, etp_dim=2),
                    ParamSpec(f"{p}.ffn.experts.w2", (F, H, D), expert=True, etp_dim=1)]
            if e.shared_experts > 0:
                out += _swiglu(f"{p}.ffn.shared", D, cfg.base_expert_hidden * e.shared_experts)
    out.append(ParamSpec("norm.weight", (D,)))
    if not m.tie_embeddings:
        out.append(ParamSpec("head.weight", (m.vocab_size, D), tp_dim=0))
    return out


def count_params(cfg) -> tuple[int, int]:
    """(total, active per token), as model.transformer.count_params counts them: a routed
    expert is active K times per token (K = routed_top_k), a PEER table row heads*top_k times."""
    total = active = 0
    e = cfg.moe
    for s in param_specs(cfg):
        total += s.numel
        if s.expert and s.name.endswith(("w1", "w2", "w3")):
            active += s.numel // s.shape[0] * e.routed_top_k
        elif s.expert:
            active += s.numel // s.shape[0] * e.peer.heads * e.peer.top_k
        else:
            active += s.numel
    return total, active


# --------------------------------------------------------------------------- layouts

@dataclass(frozen=True)
class Layout:
    """How a world of dp*tp ranks runs a config: groups (parallel/mesh.py: dp = edp x ep, tp
    innermost) and the state sharding (mode: native, fsdp, zero1, zero2)."""
    dp: int
    tp: int = 1
    ep: int = 1
    etp: bool = False
    mode: str = "native"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not one of {MODES}")
        if self.dp % self.ep:
            raise ValueError(f"ep={self.ep} must divide dp={self.dp}")

    @property
    def world(self) -> int:
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def fsdp(self) -> bool:
        return self.mode == "fsdp" and self.dp > 1      # apply_fsdp is a no-op at dp 1

    @property
    def zero_stage(self) -> int:
        return int(self.mode[-1]) if self.mode.startswith("zero") else 0

    def overrides(self) -> list[str]:
        """The config overrides that select this layout."""
        out = [f"parallel.dp={self.dp}", f"parallel.tp={self.tp}", f"parallel.ep={self.ep}",
               f"parallel.etp={str(self.etp).lower()}", f"parallel.fsdp={str(self.mode == 'fsdp').lower()}"]
        if self.zero_stage:
            out += ["train.engine=deepspeed", f"train.zero_stage={self.zero_stage}"]
        else:
            out += ["train.engine=native"]
        return out

    def __str__(self) -> str:
        return f"dp{self.dp}-tp{self.tp}-ep{self.ep}{'-etp' if self.etp else ''}-{self.mode}"


def layout_of(cfg, world: int) -> Layout:
    """The layout a config runs at this world size (config.validate_layout resolves dp).
    train.engine=deepspeed with zero_stage 0 is modelled as native (not measured)."""
    from moetrain.config import validate_layout
    dp, tp, ep = validate_layout(cfg, world)
    p, t = cfg.parallel, cfg.train
    mode = f"zero{t.zero_stage}" if t.engine == "deepspeed" and t.zero_stage > 0 else (
        "fsdp" if p.fsdp else "native")
    return Layout(dp, tp, ep, p.etp, mode)


def with_layout(cfg, layout: Layout):
    """A copy of cfg set to `layout` (not validated; config.replace_keys)."""
    from moetrain.config import replace_keys
    keys = {"parallel.dp": layout.dp, "parallel.tp": layout.tp, "parallel.ep": layout.ep,
            "parallel.etp": layout.etp, "parallel.fsdp": layout.mode == "fsdp",
            "train.engine": "deepspeed" if layout.zero_stage else "native"}
    if layout.zero_stage:
        keys["train.zero_stage"] = layout.zero_stage
    return replace_keys(cfg, keys)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(cfg, world: int, modes: Sequence[str] = MODES, etp: Iterable[bool] = (False, True),
                      check_deepspeed_installed: bool = False) -> list[Layout]:
    """Every layout of `world` ranks the config validation accepts: for each tp | world, ep | dp,
    etp, mode, the config is set to it and run through moetrain.config.validate (its parallel,
    tp and deepspeed rules) and validate_layout (dp*tp = world, ep | dp, batch divisibility).
    fsdp needs dp > 1 (a no-op otherwise); the deepspeed engine's "is the package installed"
    check is skipped unless check_deepspeed_installed (a planner runs where training will not)."""
    from moetrain.config import ConfigError, replace_keys, validate, validate_layout
    out = []
    for tp in _divisors(world):
        dp = world // tp
        for ep in _divisors(dp):
            for e in etp:
                for mode in modes:
                    lay = Layout(dp, tp, ep, e, mode)
                    if mode == "fsdp" and dp == 1:
                        continue
                    c = with_layout(cfg, lay)
                    try:
                        if lay.zero_stage and not check_deepspeed_installed:
                            validate(replace_keys(c, {"train.engine": "native"}))
                            _deepspeed_rules_only(c)
                        else:
                            validate(c)
                        validate_layout(c, world)
                    except ConfigError:
                        continue
                    out.append(lay)
    return out


def _deepspeed_rules_only(cfg) -> None:
    """config._validate_deepspeed's layout rules, without its installed-package checks."""
    from moetrain.config import need
    p, c = cfg.parallel, cfg.checkpoint
    need(not p.fsdp, "parallel.fsdp", p.fsdp, "FSDP is part of the native engine")
    need(p.tp == 1, "parallel.tp", p.tp, "train.engine=deepspeed runs data and expert parallelism only")
    need(c.every == 0, "checkpoint.every", c.every, "train.engine=deepspeed does not checkpoint")
    need(c.resume == "none", "checkpoint.resume", c.resume, "train.engine=deepspeed does not resume")


# --------------------------------------------------------------------------- per-rank shards

def fsdp_shard_dim(shape: tuple, is_expert: bool, tp_dim: Optional[int], size: int) -> Optional[int]:
    """parallel/fsdp.fsdp_shard_dim (same rule, no torch): the first dim, not the TP dim and
    not an expert's dim 0, that size divides; None = unsharded."""
    banned = {tp_dim} | ({0} if is_expert else set())
    for d in range(len(shape)):
        if d not in banned and shape[d] % size == 0:
            return d
    return None


@dataclass(frozen=True)
class LocalParam:
    spec: ParamSpec
    shape: tuple            # this rank's shard
    fsdp_sharded: bool      # an FSDP DTensor (reduced by FSDP), else synced by the loop

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _local_experts(cfg, rows: int, ep: int) -> int:
    """Dim-0 rows of an expert parameter on one rank: E/ep, or (E + R)/ep slots under
    moe.placement=balanced with R redundant replicas (parallel/replicas.py)."""
    e = cfg.moe
    if ep > 1 and e.placement == "balanced" and e.layer == "moe":
        return (rows + e.redundant_experts) // ep
    return rows // ep


def local_params(cfg, layout: Layout) -> list[LocalParam]:
    """This rank's shard of every parameter (module doc 1). Every rank of a layout holds the
    same shapes (experts and shards are split evenly), so one list describes them all."""
    out = []
    for s in param_specs(cfg):
        shape = list(s.shape)
        tp_dim = s.etp_dim if (s.expert and layout.etp) else s.tp_dim
        if layout.tp > 1 and tp_dim is not None:
            shape[tp_dim] //= layout.tp
        if s.expert:
            shape[0] = _local_experts(cfg, shape[0], layout.ep)
        sharded = False
        if layout.fsdp and s.fsdp_ok:
            size = layout.edp if s.expert else layout.dp
            # judged on the TP-global (DTensor) shape, after the EP split
            judge = list(s.shape)
            if s.expert:
                judge[0] = _local_experts(cfg, judge[0], layout.ep)
            d = fsdp_shard_dim(tuple(judge), s.expert, tp_dim if layout.tp > 1 else None, size)
            if d is not None:
                shape[d] //= size
                sharded = True
        out.append(LocalParam(s, tuple(shape), sharded))
    return out


# --------------------------------------------------------------------------- training state

@dataclass(frozen=True)
class StateBytes:
    """Per rank, bytes (module doc 2)."""
    params: int
    grads: int
    optim: int
    transient: int = 0          # FSDP unsharded units during forward/backward (not in total)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim

    def mib(self) -> dict:
        return {k: round(getattr(self, k) / MIB, 2) for k in ("params", "grads", "optim", "total", "transient")}


def _zero_partition(cfg, layout: Layout) -> int:
    """q: elements of this rank's fp32 partition over DeepSpeed's param groups."""
    groups: dict = {}
    for lp in local_params(cfg, layout):
        key = (lp.spec.decay, lp.spec.expert)
        groups[key] = groups.get(key, 0) + lp.numel
    q = 0
    for (_, expert), n in groups.items():
        w = layout.edp if expert else layout.dp
        q += math.ceil(n / (2 * w)) * 2
    return q


def fsdp_param_bytes(cfg, device: str = "cpu") -> int:
    """FSDP's all-gather dtype bytes (parallel.fsdp_param_dtype; auto = bf16 under bf16 autocast)."""
    pd = cfg.parallel.fsdp_param_dtype
    if pd == "auto":
        return compute_bytes(cfg, device)
    return DTYPE_BYTES[pd]


def state_bytes(cfg, layout: Layout, device: str = "cpu") -> StateBytes:
    """Parameter, gradient and optimizer-state bytes per rank (module doc 2)."""
    lps = local_params(cfg, layout)
    p = sum(lp.numel for lp in lps)
    n_tensors = len(lps)
    if layout.zero_stage:
        q = _zero_partition(cfg, layout)
        grads = 4 * q if layout.zero_stage == 2 else 4 * p + 4 * min(DS_BUCKET, p)
        return StateBytes(params=4 * p + 4 * q, grads=grads, optim=8 * q + 4 * _n_zero_groups(cfg, layout))
    transient = 0
    if layout.fsdp:
        # the largest FSDP unit unsharded (a block, an expert stack, or the root), x2 for prefetch
        w = fsdp_param_bytes(cfg, device)
        units: dict = {}
        for lp in lps:
            if not lp.fsdp_sharded:
                continue
            name = lp.spec.name
            unit = name.rsplit(".", 1)[0] if lp.spec.expert else (
                ".".join(name.split(".")[:2]) if name.startswith("layers.") else "root")
            full = lp.numel * (layout.edp if lp.spec.expert else layout.dp)
            units[unit] = units.get(unit, 0) + full
        transient = 2 * w * max(units.values(), default=0)
    return StateBytes(params=4 * p, grads=4 * p, optim=8 * p + 4 * n_tensors, transient=transient)


def _n_zero_groups(cfg, layout: Layout) -> int:
    """DeepSpeed's torch AdamW holds one `step` per fp32 partition (one per param group)."""
    return len({(lp.spec.decay, lp.spec.expert) for lp in local_params(cfg, layout)})


# --------------------------------------------------------------------------- precision

def compute_bytes(cfg, device: str = "cpu") -> int:
    """Bytes of the compute dtype: 2 under bf16 autocast (train.precision bf16, or auto on a
    GPU: precision.uses_bf16_autocast), else 4."""
    prec = cfg.train.precision
    bf16 = prec == "bf16" or (prec == "auto" and device == "cuda")
    return 2 if bf16 else 4


# --------------------------------------------------------------------------- routing rows

@dataclass(frozen=True)
class RoutedRows:
    """Rows of one routed MoE layer and micro-step on the busiest rank (module doc 4)."""
    send: float          # N_s
    recv: float          # N_r
    capacity: Optional[int] = None


def micro_tokens(cfg, layout: Layout, micro_batch: Optional[int] = None, seq_len: Optional[int] = None) -> int:
    from moetrain.config import micro_batch as mb
    b = micro_batch if micro_batch is not None else mb(cfg, layout.dp)
    return b * (seq_len if seq_len is not None else cfg.train.seq_len)


def capacity(cfg, tokens: int) -> Optional[int]:
    """C = max(min_capacity, ceil(cf*K*T/E)) per expert and source rank; None = dropless."""
    e = cfg.moe
    if e.capacity_factor is None:
        return None
    return max(e.min_capacity, math.ceil(e.capacity_factor * e.routed_top_k * tokens / e.num_ffn_experts))


def routed_rows(cfg, layout: Layout, tokens: int, skew: float = 1.0) -> RoutedRows:
    """N_s and N_r for T = tokens per micro-step: dropless balanced N_r = N_s = T*K, the busiest
    rank receiving skew*T*K (skew = max rank load / mean, >= 1); with a capacity C the bounds
    N_s <= min(T*K, E*C), N_r <= min(skew*N_s, ep*L*C)."""
    e = cfg.moe
    K, E = e.routed_top_k, e.num_ffn_experts
    send = float(tokens * K)
    C = capacity(cfg, tokens)
    if C is None:
        return RoutedRows(send, send * skew)
    send = min(send, float(E * C))
    L = E // layout.ep
    return RoutedRows(send, min(send * skew, float(layout.ep * L * C)), C)


def routed_moe_layers(cfg) -> int:
    """Layers that route over the all-to-all (FFN experts, not PEER)."""
    if cfg.moe.num_experts == 0 or cfg.moe.layer != "moe":
        return 0
    return sum(is_moe_layer(cfg, i) for i in range(cfg.model.n_layers))


# --------------------------------------------------------------------------- all-to-all

@dataclass(frozen=True)
class A2ABytes:
    """Bytes one rank sends (= receives) by the token all-to-alls (module doc 4)."""
    dispatch: float = 0
    combine: float = 0
    dispatch_bwd: float = 0
    combine_bwd: float = 0
    counts_bytes: float = 0          # the int64 count exchange (not in ranks.a2a_mb)
    off_rank: float = 0              # of the total, what leaves the rank

    @property
    def total(self) -> float:
        return self.dispatch + self.combine + self.dispatch_bwd + self.combine_bwd

    def __add__(self, o: "A2ABytes") -> "A2ABytes":
        return A2ABytes(*(getattr(self, f.name) + getattr(o, f.name) for f in dataclasses.fields(self)))

    def scale(self, k: float) -> "A2ABytes":
        return A2ABytes(*(getattr(self, f.name) * k for f in dataclasses.fields(self)))


def a2a_bytes_rows(send_rows: float, recv_rows: float, dim: int, payload_bytes: int, num_experts: int = 0,
                   self_send: float = 0.0, self_recv: Optional[float] = None) -> A2ABytes:
    """One layer-micro-step (or any sum of them): sent bytes = 2*(N_s + N_r)*D*c split into the
    four phases; self_send/self_recv = rows a rank sends to / receives from itself."""
    row = dim * payload_bytes
    self_recv = self_send if self_recv is None else self_recv
    off = (send_rows - self_send + recv_rows - self_recv) * 2 * row
    return A2ABytes(send_rows * row, recv_rows * row, recv_rows * row, send_rows * row,
                    num_experts * 8, off)


def recv_rows_from_loads(loads_E: Sequence[float], ep: int) -> list[float]:
    """Rows each EP rank's experts receive, from per-expert loads summed over one EP group
    (rank r holds experts [r*L, (r+1)*L)): with dp = ep the whole run's `moe.layer{i}.kept`."""
    L = len(loads_E) // ep
    return [float(sum(loads_E[r * L:(r + 1) * L])) for r in range(ep)]


def a2a_bytes_from_counts(cfg, layout: Layout, counts, payload_bytes: int = 4) -> list[float]:
    """EXACT bytes each rank of one EP group sends in a step, from routing counts:
    counts[l][src][e] = copies the EP rank src sent to FFN expert e in routed MoE layer l, summed
    over the step's micro-steps (kept copies; dropless: all). Rank r sends sum_e counts[l][r][e]
    rows and receives sum_src sum_{e of r} counts[l][src][e] (experts [r*L, (r+1)*L)).
    Returns [ep] bytes = 2*(N_s+N_r)*D*c summed over layers: what `ranks.a2a_mb` * 2**20 is."""
    ep, D = layout.ep, cfg.model.dim
    out = [0.0] * ep
    for layer in counts:
        E = len(layer[0])
        L = E // ep
        for r in range(ep):
            send = sum(layer[r])
            recv = sum(layer[s][e] for s in range(ep) for e in range(r * L, (r + 1) * L))
            out[r] += a2a_bytes_rows(send, recv, D, payload_bytes).total
    return out


def a2a_step_bytes(cfg, layout: Layout, device: str = "cpu", skew: float = 1.0,
                   micro_batch: Optional[int] = None, seq_len: Optional[int] = None,
                   global_batch: Optional[int] = None) -> A2ABytes:
    """Modelled all-to-all bytes of the busiest rank per optimizer step: every routed MoE layer,
    every micro-step; uniform routing sends 1/ep of each side to the rank itself."""
    if layout.ep == 1:
        return A2ABytes()
    T = micro_tokens(cfg, layout, micro_batch, seq_len)
    rows = routed_rows(cfg, layout, T, skew)
    c = compute_bytes(cfg, device)
    one = a2a_bytes_rows(rows.send, rows.recv, cfg.model.dim, c, cfg.moe.num_ffn_experts,
                         self_send=rows.send / layout.ep, self_recv=rows.recv / layout.ep)
    return one.scale(routed_moe_layers(cfg) * micro_steps(cfg, layout, micro_batch, global_batch))


def micro_steps(cfg, layout: Layout, micro_batch: Optional[int] = None, global_batch: Optional[int] = None) -> int:
    from moetrain.config import micro_batch as mb
    g = global_batch if global_batch is not None else cfg.train.global_batch_size
    b = micro_batch if micro_batch is not None else mb(cfg, layout.dp)
    return max(1, g // (layout.dp * b))


# --------------------------------------------------------------------------- gradient reduction

@dataclass(frozen=True)
class Collective:
    """One kind of collective per step on one rank: buffer bytes summed over its calls, group
    size, and the bytes a ring implementation sends per rank."""
    name: str
    group: str
    size: int
    buffer_bytes: float
    kind: str                    # all_reduce | reduce_scatter | all_gather

    @property
    def wire_bytes(self) -> float:
        if self.size <= 1:
            return 0.0
        f = 2 * (self.size - 1) / self.size if self.kind == "all_reduce" else (self.size - 1) / self.size
        return self.buffer_bytes * f


def grad_sync_bytes(cfg, layout: Layout, device: str = "cpu", micro_batch: Optional[int] = None,
                    global_batch: Optional[int] = None) -> list[Collective]:
    """Gradient (and, for FSDP/ZeRO, parameter) collectives per step (module doc 5)."""
    lps = local_params(cfg, layout)
    m = micro_steps(cfg, layout, micro_batch, global_batch)
    out: list[Collective] = []
    for expert, group, size in ((False, "dp", layout.dp), (True, "edp", layout.edp)):
        mine = [lp for lp in lps if lp.spec.expert == expert]
        if size <= 1 or not mine:
            continue
        if layout.zero_stage:
            full = 4 * sum(lp.numel for lp in mine)
            out.append(Collective(f"{'expert' if expert else 'dense'} grads", group, size,
                                  full * (m if layout.zero_stage == 2 else 1), "reduce_scatter"))
            out.append(Collective(f"{'expert' if expert else 'dense'} params", group, size, full, "all_gather"))
            continue
        plain = [lp for lp in mine if not lp.fsdp_sharded]
        if plain:
            out.append(Collective(f"{'expert' if expert else 'dense'} grads", group, size,
                                  4 * sum(lp.numel for lp in plain), "all_reduce"))
        sharded = [lp for lp in mine if lp.fsdp_sharded]
        if sharded:
            full = sum(lp.numel for lp in sharded) * size
            pw, rw = fsdp_param_bytes(cfg, device), DTYPE_BYTES[cfg.parallel.fsdp_reduce_dtype]
            out.append(Collective(f"{'expert' if expert else 'dense'} params (fsdp)", group, size,
                                  2 * m * full * pw, "all_gather"))
            out.append(Collective(f"{'expert' if expert else 'dense'} grads (fsdp)", group, size,
                                  m * full * rw, "reduce_scatter"))
    return out


# --------------------------------------------------------------------------- tensor parallelism

def tp_bytes(cfg, layout: Layout, device: str = "cpu", skew: float = 1.0, micro_batch: Optional[int] = None,
             seq_len: Optional[int] = None, global_batch: Optional[int] = None) -> Collective:
    """TP all-reduce bytes per step on one rank (module doc 6), as one Collective over tp."""
    if layout.tp == 1:
        return Collective("tp activations", "tp", 1, 0.0, "all_reduce")
    m, e = cfg.model, cfg.moe
    T = micro_tokens(cfg, layout, micro_batch, seq_len)
    c = compute_bytes(cfg, device)
    blocks = m.n_layers                                   # attention
    for i in range(m.n_layers):
        if not is_moe_layer(cfg, i) or (e.layer == "moe" and e.shared_experts > 0):
            blocks += 1                                   # dense FFN or shared experts
    per_micro = 2 * blocks * T * m.dim * c + 2 * T * m.dim * c + 3 * T * 4
    if layout.etp:
        per_micro += 2 * routed_moe_layers(cfg) * routed_rows(cfg, layout, T, skew).recv * m.dim * c
    return Collective("tp activations", "tp", layout.tp,
                      per_micro * micro_steps(cfg, layout, micro_batch, global_batch), "all_reduce")


# --------------------------------------------------------------------------- activations

def activation_bytes(cfg, layout: Layout, device: str = "cpu", skew: float = 1.0,
                     micro_batch: Optional[int] = None, seq_len: Optional[int] = None) -> int:
    """Bytes autograd keeps for backward during one micro-step on the busiest rank (module doc 3).
    No activation checkpointing (moetrain has none)."""
    m, e = cfg.model, cfg.moe
    T = micro_tokens(cfg, layout, micro_batch, seq_len)
    D, tp = m.dim, layout.tp
    c = compute_bytes(cfg, device)
    norm = 2 * T * D * 4 + T * 4                       # residual in, x*rsqrt, rsqrt

    def inp(n: int) -> int:
        """The normalized input of n matmuls: one fp32 tensor, or n bf16 casts under autocast
        (autocast caches casts of weights, not of activations)."""
        return T * D * 4 if c == 4 else n * T * D * c

    attn = norm + inp(3) + (3 * D + 2 * m.kv_heads * m.head_dim) * T * c // tp + T * (m.n_heads // tp) * 4

    def ffn(hidden: int) -> int:                       # w1 out, w3 out, silu out, product
        return 4 * T * hidden * c // tp

    total = 0
    for i in range(m.n_layers):
        total += attn + norm
        if not is_moe_layer(cfg, i):
            total += inp(2) + ffn(m.ffn_hidden)
        elif e.layer == "peer":
            pc = e.peer
            hk, q = pc.heads * pc.top_k, pc.heads * pc.key_dim
            rows = pc.num_keys ** 2 // layout.ep
            total += inp(1) + 2 * T * q * 4 + T * hk * (3 * 8 + 4 + 8)   # query (+BN); top-k ids, weights
            if rows <= 32 * hk:           # moe/peer.py scores every local row with one GEMM
                total += 2 * T * rows * 4 + T * hk * 13
            else:                         # gathers the picked rows (approximate)
                total += 2 * T * hk * D * 4 + T * hk * 13
        else:
            K, E = e.routed_top_k, e.num_router_outputs
            total += T * D * 4 + 2 * T * E * 4 + T * K * 12 + 3 * T * 4   # router (fp32 input)
            rows = routed_rows(cfg, layout, T, skew)
            H = cfg.expert_hidden // (tp if layout.etp else 1)
            ep_idx = 2 * rows.recv * 8 if layout.ep > 1 else 0          # regroup / ungroup permutations
            total += int(rows.send * (2 * 8 + 4)                          # token / copy ids, gate weights
                         + rows.recv * D * c + 2 * rows.recv * H * c      # expert input, w1 and w3 outputs
                         + rows.send * D * 8 + ep_idx)                    # returned rows in fp32, weighted
            if e.shared_experts > 0:     # fp32: the router's input; bf16: two casts of it
                total += (0 if c == 4 else inp(2)) + ffn(cfg.base_expert_hidden * e.shared_experts)
    total += norm + inp(1) + T * (m.vocab_size // tp) * 4 + 2 * T * 8    # log-softmax, tokens, targets
    return total


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """Everything modelled for one layout, per rank (the busiest one where ranks differ)."""
    layout: Layout
    state: StateBytes
    activations: int                      # per micro-step
    a2a: A2ABytes                         # per step
    grad_sync: list = field(default_factory=list)     # [Collective] per step
    tp: Optional[Collective] = None       # per step
    micro_batch: int = 1
    micro_steps: int = 1
    weight_copies: int = 0                # compute-dtype weight copies held from forward to backward

    @property
    def memory_bytes(self) -> int:
        """Peak estimate: training state + one micro-step's activations + FSDP's transient units
        + the compute-dtype weight copies."""
        return self.state.total + self.activations + self.state.transient + self.weight_copies


def weight_copy_bytes(cfg, layout: Layout, device: str = "cpu") -> int:
    """Under bf16 autocast every fp32 weight a forward uses is cast to bf16 once and the copy is
    kept for backward (autocast's cast cache; the grouped experts cast their stacks and save
    them): 2 bytes per local (TP/EP-sharded, FSDP-unsharded) parameter. FSDP gathering bf16
    weights (parallel.fsdp_param_dtype bf16 / auto) needs no cast: 0. fp32 compute: 0."""
    if compute_bytes(cfg, device) == 4 or (layout.fsdp and fsdp_param_bytes(cfg, device) == 2):
        return 0
    unsharded = dataclasses.replace(layout, mode="native")

    def cast(s: ParamSpec) -> bool:       # matrices a matmul reads under autocast
        if len(s.shape) < 2 or ".router." in s.name:          # norms; routers run in fp32
            return False
        return s.name != "embed.weight" or cfg.model.tie_embeddings      # a lookup is not cast
    return 2 * sum(lp.numel for lp in local_params(cfg, unsharded) if cast(lp.spec))


def plan(cfg, layout: Layout, device: str = "cpu", skew: float = 1.0, micro_batch: Optional[int] = None,
         seq_len: Optional[int] = None, global_batch: Optional[int] = None) -> Plan:
    from moetrain.config import micro_batch as mb
    b = micro_batch if micro_batch is not None else mb(cfg, layout.dp)
    kw = dict(micro_batch=b, global_batch=global_batch)
    return Plan(layout=layout, state=state_bytes(cfg, layout, device),
                activations=activation_bytes(cfg, layout, device, skew, b, seq_len),
                a2a=a2a_step_bytes(cfg, layout, device, skew, seq_len=seq_len, **kw),
                grad_sync=grad_sync_bytes(cfg, layout, device, **kw),
                tp=tp_bytes(cfg, layout, device, skew, seq_len=seq_len, **kw),
                micro_batch=b, micro_steps=micro_steps(cfg, layout, **kw),
                weight_copies=weight_copy_bytes(cfg, layout, device))


def flops_per_token(cfg, seq_len: Optional[int] = None) -> float:
    """Training FLOPs per token, 6 x active matmul parameters (embedding lookup excluded, head
    included) plus causal attention 6*n_layers*s*D (fwd 2*2*s*D/2 for QK^T and AV over half the
    keys on average, x3 for backward)."""
    s = seq_len if seq_len is not None else cfg.train.seq_len
    _, active = count_params(cfg)
    active -= cfg.model.vocab_size * cfg.model.dim if not cfg.model.tie_embeddings else 0
    return 6.0 * active + 6.0 * cfg.model.n_layers * s * cfg.model.dim


# --------------------------------------------------------------------------- step time (planner)

@dataclass(frozen=True)
class Hardware:
    """One accelerator and its node (configs/hardware/*.yaml). Bandwidths are per GPU and per
    direction, in GB/s (1e9 bytes)."""
    name: str
    bf16_tflops: float
    memory_gib: float
    intra_node_GBps: float
    inter_node_GBps: float
    memory_reserve_gib: float = 0.0
    compute_efficiency: float = 0.4
    comm_efficiency: float = 0.7
    # optional fixed costs (0 for the GPU presets; tools/calibrate_hardware.py measures them on CPU)
    layer_overhead_ms: float = 0.0        # per transformer layer and micro-step (fwd + bwd per-op costs)
    optimizer_ns_per_param: float = 0.0   # optimizer step + zero_grad, per local parameter
    collective_latency_us: float = 0.0    # per collective call (a2a, TP all-reduce, gradient bucket)
    allreduce_GBps: Optional[float] = None        # all-reduces' own bus rate and latency where they
    allreduce_latency_us: Optional[float] = None  # differ (gloo on CPU); None: the figures above
    by_local_ranks: Optional[dict] = None  # {ranks sharing a node: {field: value}} (CPU: cores shared)

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gib - self.memory_reserve_gib) * 2 ** 30

    def for_ranks(self, local_ranks: int) -> "Hardware":
        """The figures when `local_ranks` ranks share a node: by_local_ranks' entry for that
        count, else for the largest count below it (the smallest one if none is below)."""
        if not self.by_local_ranks:
            return self
        table = {int(k): v for k, v in self.by_local_ranks.items()}
        below = [k for k in table if k <= local_ranks]
        key = max(below) if below else min(table)
        return dataclasses.replace(self, by_local_ranks=None, **table[key])


def flops_split(cfg, seq_len: Optional[int] = None) -> tuple[float, float]:
    """(dense, routed-expert) training FLOPs per token: 6 x active matmul parameters (the
    embedding lookup excluded, the head included) + causal attention 6*n_layers*s*D, and
    6 x the K routed experts' 3*D*H per routed MoE layer."""
    total = flops_per_token(cfg, seq_len)
    e = cfg.moe
    expert = 6.0 * routed_moe_layers(cfg) * e.routed_top_k * 3 * cfg.model.dim * cfg.expert_hidden
    return total - expert, expert


def _peers(layout: Layout, gpus_per_node: int) -> tuple[int, int]:
    """(EP peers on this rank's node, on other nodes). EP groups hold ranks tp apart inside a
    block of ep*tp consecutive ranks (parallel/mesh.py)."""
    on_node = max(1, min(layout.ep, gpus_per_node // layout.tp)) if layout.tp <= gpus_per_node else 1
    return on_node - 1, layout.ep - on_node


def _intra(size: int, span: int, gpus_per_node: int) -> bool:
    return size <= 1 or span <= gpus_per_node


@dataclass(frozen=True)
class StepTime:
    """Modelled seconds of one optimizer step on the busiest rank, no overlap assumed."""
    compute: float
    a2a_intra: float
    a2a_inter: float
    grad_sync: float
    tp: float
    overhead: float = 0.0        # layer_overhead_ms x layers x micro-steps
    optimizer: float = 0.0       # optimizer_ns_per_param x local parameters

    @property
    def total(self) -> float:
        return (self.compute + self.a2a_intra + self.a2a_inter + self.grad_sync + self.tp + self.overhead
                + self.optimizer)


def step_time(cfg, pl: Plan, hw: Hardware, gpus_per_node: int, skew: float = 1.0,
              seq_len: Optional[int] = None, global_batch: Optional[int] = None) -> StepTime:
    """compute = FLOPs of the rank / (bf16 peak x compute_efficiency), where a rank does the dense
    FLOPs of its dp share / tp and the expert FLOPs of its dp share x skew (/ tp only with etp:
    plain TP replicates the experts); a2a = off-rank bytes split evenly over the ep-1 peers, those
    on the node at intra_node_GBps, the others at inter_node_GBps; gradient / parameter
    collectives and TP all-reduces = ring wire bytes at the bandwidth of their slowest link (a
    group spanning nodes runs at inter_node_GBps); every bandwidth x comm_efficiency.
    Fixed costs (optional hardware fields, 0 for the GPU presets): layer_overhead_ms per layer and
    micro-step, optimizer_ns_per_param per local parameter (the ZeRO partition under ZeRO),
    collective_latency_us per call (all-reduces: allreduce_latency_us and allreduce_GBps when
    given): 5 a2a calls (counts, dispatch, combine and their backward)
    per routed MoE layer and micro-step, per micro-step 2 TP all-reduces per block of module
    doc 6 + 2 (embedding, head) + 3 (loss) (+ 2 per routed layer with etp), one per gradient
    collective. by_local_ranks: the figures for min(world, gpus_per_node) ranks per node."""
    lay = pl.layout
    hw = hw.for_ranks(min(lay.world, gpus_per_node))
    lat = hw.collective_latency_us * 1e-6
    m = pl.micro_steps
    s = seq_len if seq_len is not None else cfg.train.seq_len
    g = global_batch if global_batch is not None else cfg.train.global_batch_size
    tokens = g * s / lay.dp
    dense, expert = flops_split(cfg, s)
    flops = tokens * (dense / lay.tp + expert * skew / (lay.tp if lay.etp else 1))
    compute = flops / (hw.bf16_tflops * 1e12 * hw.compute_efficiency)
    intra_bw = hw.intra_node_GBps * 1e9 * hw.comm_efficiency
    inter_bw = hw.inter_node_GBps * 1e9 * hw.comm_efficiency
    a_intra = a_inter = 0.0
    if lay.ep > 1:
        near, far = _peers(lay, gpus_per_node)
        per_peer = pl.a2a.off_rank / (lay.ep - 1)
        a_intra, a_inter = near * per_peer / intra_bw, far * per_peer / inter_bw
        calls = 5 * routed_moe_layers(cfg) * m * lat
        if far and not near:
            a_inter += calls
        else:
            a_intra += calls
    ar_bw = hw.allreduce_GBps * 1e9 * hw.comm_efficiency if hw.allreduce_GBps else intra_bw
    ar_lat = hw.allreduce_latency_us * 1e-6 if hw.allreduce_latency_us is not None else lat
    grad = 0.0
    for c in pl.grad_sync:
        near_bw, near_lat = (ar_bw, ar_lat) if c.kind == "all_reduce" else (intra_bw, lat)
        grad += c.wire_bytes / (near_bw if _intra(c.size, lay.world, gpus_per_node) else inter_bw)
        grad += near_lat if c.size > 1 else 0.0
    tp = 0.0
    if pl.tp is not None and lay.tp > 1:
        tp = pl.tp.wire_bytes / (ar_bw if lay.tp <= gpus_per_node else inter_bw)
        e = cfg.moe
        blocks = cfg.model.n_layers + sum(not is_moe_layer(cfg, i) or (e.layer == "moe" and e.shared_experts > 0)
                                          for i in range(cfg.model.n_layers))
        tp += m * (2 * blocks + 5 + (2 * routed_moe_layers(cfg) if lay.etp else 0)) * ar_lat
    overhead = cfg.model.n_layers * m * hw.layer_overhead_ms * 1e-3
    n_params = _zero_partition(cfg, lay) if lay.zero_stage else sum(lp.numel for lp in local_params(cfg, lay))
    optimizer = n_params * hw.optimizer_ns_per_param * 1e-9
    return StepTime(compute, a_intra, a_inter, grad, tp, overhead, optimizer)
