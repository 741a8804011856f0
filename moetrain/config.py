"""The config schema (nested dataclasses), loading (YAML + dotted overrides via OmegaConf) and
validation.

Every check here runs before any process group exists, on every rank, so a bad config ends each
rank with the same one-line message and exit code 2 instead of a hang in a collective.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moetrain.errors import first_line


class ConfigError(ValueError):
    """One line naming the key, the value and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None   # grouped-query attention: K/V heads, each shared by n_heads/n_kv_heads
                                       # query heads; null = n_heads (multi-head attention)
    max_seq_len: int = 256
    ffn_hidden: int = 384          # hidden size of a dense SwiGLU FFN
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# router names, what each needs and supports, and its checks: moetrain/moe/router.py ROUTERS
OVERFLOW = ("residual", "reroute")
GROUPED_MM = ("auto", "loop", "bmm", "grouped")
AUX_SCOPES = ("micro_batch", "sequence", "global_batch")
LAYER_KINDS = ("moe", "peer")


@dataclass(frozen=True)
class ZeroExpertsConfig:
    """MoE++ zero-computation experts (never sent through the all-to-all)."""
    zero: int = 0
    copy: int = 0
    constant: int = 0


@dataclass(frozen=True)
class PeerConfig:
    """PEER (He 2024): N = num_keys^2 single-neuron experts retrieved by product keys."""
    num_keys: int = 64             # n; N = n^2 experts
    heads: int = 4
    top_k: int = 8
    key_dim: int = 64              # query size per head (split into two halves)
    query_bn: bool = True
    # sparse (rows, values) expert-table gradients + lazy AdamW on the retrieved rows only
    # (train/lazy_adam.py); false = dense [N, D] gradients and AdamW over every row (the reference)
    sparse_updates: bool = False


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8           # 0 = dense model
    top_k: int = 2
    router: str = "topk"
    capacity_factor: Optional[float] = 1.25   # null = dropless
    min_capacity: int = 4
    every: int = 1                 # layer i has an MoE FFN when i >= first_dense_layers and (i + 1) % every == 0
    first_dense_layers: int = 0    # DeepSeekMoE first_k_dense: layers 0..N-1 keep a dense FFN (model.ffn_hidden)
    shared_experts: int = 0
    expert_hidden: Optional[int] = None       # null = model.ffn_hidden // top_k (same active params)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    norm_topk_prob: bool = True    # renormalize the k selected gates to sum to 1
    router_jitter: float = 0.0
    grouped_mm: str = "auto"       # auto | loop | bmm | grouped (torch._grouped_mm: bf16, dims multiples of 8)
    overlap: bool = True           # overlap the all-to-all with shared-expert compute
    layer: str = "moe"             # moe | peer
    expert_granularity: int = 1    # DeepSeekMoE fine-grained: m narrower experts per expert, top_k*m
    zero_experts: ZeroExpertsConfig = field(default_factory=ZeroExpertsConfig)
    gated_residual: bool = False   # MoE++: routing logits += W * previous MoE layer's logits
    overflow: str = "residual"     # residual | reroute (overflowed copy -> next-best expert with room)
    aux_loss_scope: str = "micro_batch"   # micro_batch | sequence | global_batch
    aux_free_gamma: float = 0.001  # aux_free bias update speed
    renormalize_after_drop: bool = False  # DeepSpeed top-2: surviving copies' gates renormalized after the cut
    placement: str = "static"      # static (rank r: experts [r*E/ep, (r+1)*E/ep)) | balanced (re-placed from measured load)
    redundant_experts: int = 0     # balanced: extra replicas of the hottest experts ((E + R) % ep == 0)
    rebalance_every: int = 100     # balanced: re-place experts every N optimizer steps
    peer: PeerConfig = field(default_factory=PeerConfig)

    @property
    def num_ffn_experts(self) -> int:       # experts actually built
        return self.num_experts * self.expert_granularity

    @property
    def routed_top_k(self) -> int:
        return self.top_k * self.expert_granularity

    @property
    def num_zero_experts(self) -> int:
        return self.zero_experts.zero + self.zero_experts.copy + self.zero_experts.constant

    @property
    def num_router_outputs(self) -> int:    # FFN + zero-computation experts: width of routing statistics
        return self.num_ffn_experts + self.num_zero_experts


@dataclass(frozen=True)
class ParallelConfig:
    dp: Optional[int] = None       # null = world // tp
    tp: int = 1                    # tensor parallel: attention heads, dense FFNs, vocab
    ep: Any = 1                    # expert-parallel size, or "auto": chosen for the world size at every start (resolve_layout)
    ep_max: Optional[int] = None   # ep=auto: the largest ep to choose (null: no cap)
    etp: bool = False              # expert tensor parallel: each expert's hidden dim split over tp
    fsdp: bool = False             # FSDP2: shard dense params over dp, experts over edp (engine native)
    fsdp_param_dtype: str = "auto"       # FSDP all-gather/compute dtype: auto (bf16 on CUDA) | float32 | bfloat16
    fsdp_reduce_dtype: str = "float32"   # FSDP gradient reduce-scatter dtype: float32 | bfloat16
    backend: str = "auto"          # auto (nccl on CUDA, gloo on CPU) | nccl | gloo (gloo on CUDA: ranks may share a GPU)
    grad_bucket_mb: float = 25.0   # gradient all-reduce buckets, launched during the last backward; 0 = one after it


ENGINES = ("native", "deepspeed")
BACKENDS = ("auto", "nccl", "gloo")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
FSDP_DTYPES = ("auto", "float32", "bfloat16")
ZERO_STAGES = (0, 1, 2)
PLACEMENTS = ("static", "balanced")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    global_batch_size: int = 16    # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8      # sequences per rank per forward/backward (at most global/dp)
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    seed: int = 1234
    grad_clip: float = 1.0         # 0 disables clipping
    engine: str = "native"         # native | deepspeed (ZeRO via deepspeed.initialize; train/ds_engine.py)
    zero_stage: int = 1            # engine deepspeed: ZeRO stage 0, 1 or 2
    device: str = "auto"           # auto | cpu | cuda
    deterministic: bool = False    # deterministic CUDA algorithms (layout equality and bitwise resume on GPUs)
    precision: str = "auto"        # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    eval_every: int = 100
    eval_batches: int = 8
    num_threads: int = 0           # 0 = cores / local ranks
    progress: bool = True
    # signals that stop training gracefully (finish the step, save, exit 128 + signal); [] = off
    exit_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


DATA_SOURCES = ("stdlib", "memmap")


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    path: Optional[str] = None
    cache_dir: Optional[str] = None


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "checkpoints"
    every: int = 0                 # > 0 enables saving: every N steps and after the last; 0 = never
    keep_last: int = 3
    resume: str = "none"           # auto | none | <path>
    async_save: bool = False       # overlap checkpoint writing with training (`async` is a keyword)
    snapshot_every: int = 0        # > 0: in-memory snapshot + peer replica every N steps (checkpoint/snapshot.py)
    snapshot_dir: str = "/dev/shm/moetrain-snapshots"   # node-local host memory; <dir>/<run_name>/<node>/


@dataclass(frozen=True)
class LoggingConfig:
    dir: str = "runs"
    run_name: str = "tiny"
    every: int = 10
    tensorboard: bool = True


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def base_expert_hidden(self) -> int:
        """Hidden size of one coarse expert (before fine-grained segmentation)."""
        if self.moe.expert_hidden is not None:
            return self.moe.expert_hidden
        return max(1, self.model.ffn_hidden // max(1, self.moe.top_k))

    @property
    def expert_hidden(self) -> int:
        return self.base_expert_hidden // self.moe.expert_granularity

    # the moe group's derived sizes, also reachable from the whole config
    num_ffn_experts = property(lambda self: self.moe.num_ffn_experts)
    num_router_outputs = property(lambda self: self.moe.num_router_outputs)
    routed_top_k = property(lambda self: self.moe.routed_top_k)


def is_moe_layer(cfg: Config, i: int) -> bool:
    """THE rule for which layers have an MoE FFN (or a PEER layer): an MoE model
    (moe.num_experts > 0), past the first moe.first_dense_layers layers, every moe.every-th
    layer counted from the first ((i + 1) % every == 0, so every=2 makes layers 1, 3, 5, ...
    MoE). The other layers have a dense SwiGLU of width model.ffn_hidden. Everything that asks
    "is layer i MoE" (the model, growth, HF mapping, the planner) calls this."""
    e = cfg.moe
    return e.num_experts > 0 and i >= e.first_dense_layers and (i + 1) % e.every == 0


def has_dense_layers(cfg: Config) -> bool:
    """Some layer has a dense SwiGLU FFN (model.ffn_hidden is used)."""
    return not all(is_moe_layer(cfg, i) for i in range(cfg.model.n_layers))


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf messages span lines (full_key/object_type footers); keep the essential one."""
    msg = first_line(exc)
    key = getattr(exc, "full_key", None)
    null = re.match(r"Incompatible value 'None' for field of type '(\w+)'", msg)
    if key and null:
        return f"{key}=null is not allowed: must be a {null.group(1)} (an empty override value means null)"
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return msg


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Schema defaults <- YAML file <- dotted `key=value` overrides, then validate()."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path!r} not found")
            try:
                loaded = OmegaConf.load(path)
            except Exception as exc:  # yaml.YAMLError and friends
                raise ConfigError(f"config file {path!r} is not valid YAML: {first_line(exc)}") from None
            if loaded is None:
                loaded = OmegaConf.create({})
            if not isinstance(loaded, type(OmegaConf.create({}))):
                raise ConfigError(f"config file {path!r} must hold a mapping of groups, got a list")
            _check_groups(loaded, schema, "", path)
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like group.key=value")
            key = item.split("=", 1)[0]
            if OmegaConf.is_dict(OmegaConf.select(schema, key, default=None)):    # moe, moe.zero_experts, ...
                raise ConfigError(f"override {item!r} is not allowed: {key} is a group; set {key}.<key>=value")
            if OmegaConf.select(schema, key, default="__missing__") == "__missing__" and not _is_group_key(key):
                raise ConfigError(f"unknown config key {key!r} (from override {item!r})")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    validate(cfg)
    return cfg


def _check_groups(loaded, schema, prefix: str, path: str) -> None:
    """A YAML scalar or list where the schema has a group (moe: 3, moe.zero_experts: 3) -> one
    line naming the key (OmegaConf's merge error names neither key nor file)."""
    for key, val in loaded.items():
        node = schema.get(key) if OmegaConf.is_dict(schema) and key in schema else None
        if not OmegaConf.is_dict(node) or val is None:
            continue
        full = f"{prefix}{key}"
        if not OmegaConf.is_dict(val):
            shown = OmegaConf.to_container(val) if OmegaConf.is_config(val) else val
            raise ConfigError(f"{full}={shown!r} is not allowed: must be a mapping of {full}.* keys (in {path!r})")
        _check_groups(val, node, full + ".", path)


def _is_group_key(key: str) -> bool:
    parts = key.split(".")
    node: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(node):
            return False
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return False
        f = fields[part]
        node = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        node = type(node) if dataclasses.is_dataclass(node) else node
    return True


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def replace_keys(node: Any, values: dict) -> Any:
    """A copy of a frozen config with dotted keys set ({"checkpoint.dir": d}), not validated again."""
    for key, value in values.items():
        head, _, rest = key.partition(".")
        node = dataclasses.replace(node, **{head: replace_keys(getattr(node, head), {rest: value}) if rest else value})
    return node


# Keys that may differ between ranks: where each node caches the tokenized corpus (node-local
# scratch; the bytes are the same) and its thread count (cores per node). Everything else must be
# identical on every rank (moetrain.parallel.rendezvous.agree_at_startup checks it at start-up).
PER_RANK_KEYS = ("data.cache_dir", "train.num_threads")


def agreement_view(cfg: Config) -> dict:
    """{"config": {dotted key: value}}: the resolved config every rank must share (all keys but
    PER_RANK_KEYS), for the start-up comparison across ranks."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif f"{prefix}{key}" not in PER_RANK_KEYS:
                flat[f"{prefix}{key}"] = value
    walk(to_dict(cfg), "")
    return {"config": flat}


GROUPED_ALIGN = 8          # bf16 elements per 16 bytes: torch._grouped_mm's row-stride alignment


def grouped_mm_misfit(dim: int, hidden: int) -> Optional[str]:
    """Why torch._grouped_mm cannot run experts of these sizes (bf16 rows of dim and of the local
    expert hidden size must be 16-byte aligned), or None."""
    bad = [f"{name}={v}" for name, v in (("dim", dim), ("expert hidden", hidden)) if v % GROUPED_ALIGN]
    if bad:
        return (f"torch._grouped_mm needs 16-byte aligned bf16 rows ({', '.join(bad)} not a multiple "
                f"of {GROUPED_ALIGN})")
    return None


def need(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _finite_floats(node: Any, prefix: str) -> None:
    """No float key may be nan or inf (inf passes every `> 0` check and then breaks training)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _finite_floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            need(math.isfinite(value), f"{prefix}{f.name}", value, "must be a finite number")


def validate(cfg: Config) -> None:
    """Range and cross-key checks that need no process group, one group of keys at a time."""
    _finite_floats(cfg, "")
    _validate_model(cfg.model)
    _validate_moe(cfg)
    _validate_tp(cfg)
    _validate_parallel(cfg)
    _validate_train(cfg)
    _validate_outputs(cfg)


def _validate_model(m: ModelConfig) -> None:
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_hidden"):
        need(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    need(m.vocab_size <= 2 ** 32, "model.vocab_size", m.vocab_size, "must be <= 2**32 (uint32 token files)")
    need(m.dim % m.n_heads == 0, "model.dim", m.dim, f"must be divisible by model.n_heads={m.n_heads}")
    need((m.dim // m.n_heads) % 2 == 0, "model.n_heads", m.n_heads, "dim/n_heads must be even (RoPE)")
    need(m.n_kv_heads is None or (m.n_kv_heads >= 1 and m.n_heads % m.n_kv_heads == 0), "model.n_kv_heads",
         m.n_kv_heads, f"must divide model.n_heads={m.n_heads} (or null = n_heads)")
    need(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")
    need(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
    need(m.rope_theta > 1, "model.rope_theta", m.rope_theta, "must be > 1 (RoPE base)")


def _validate_moe(cfg: Config) -> None:
    """moe.*: ranges, then what the chosen router implies (its registry entry, moe/router.py)."""
    m, e = cfg.model, cfg.moe
    need(e.num_experts >= 0, "moe.num_experts", e.num_experts, "must be >= 0 (0 = dense model)")
    _validate_sparse_updates(cfg)
    if e.num_experts == 0:
        return
    from moetrain.moe.router import ROUTERS      # imports torch, so only once a config is checked
    need(e.router in ROUTERS, "moe.router", e.router, f"one of {', '.join(ROUTERS)}")
    need(e.top_k >= 1, "moe.top_k", e.top_k, "must be >= 1")
    for key in ("zero", "copy", "constant"):
        value = getattr(e.zero_experts, key)
        need(value >= 0, f"moe.zero_experts.{key}", value, "must be >= 0")
    zero = f" + {e.num_zero_experts} zero-computation experts" if e.num_zero_experts else ""
    need(e.top_k <= e.num_experts + e.num_zero_experts, "moe.top_k", e.top_k,
         f"must be <= moe.num_experts={e.num_experts}{zero}")
    need(e.capacity_factor is None or e.capacity_factor > 0, "moe.capacity_factor", e.capacity_factor,
         "must be > 0, or null for dropless")
    need(e.every >= 1, "moe.every", e.every, "must be >= 1")
    need(e.every <= m.n_layers, "moe.every", e.every, f"must be <= model.n_layers={m.n_layers}")
    need(e.first_dense_layers >= 0, "moe.first_dense_layers", e.first_dense_layers, "must be >= 0")
    need(any(is_moe_layer(cfg, i) for i in range(m.n_layers)), "moe.first_dense_layers", e.first_dense_layers,
         f"leaves no MoE layer among model.n_layers={m.n_layers} with moe.every={e.every} "
         "(use moe.num_experts=0 for a dense model)")
    for key in ("min_capacity", "shared_experts", "aux_loss_coef", "z_loss_coef", "router_jitter", "aux_free_gamma"):
        need(getattr(e, key) >= 0, f"moe.{key}", getattr(e, key), "must be >= 0")
    need(e.expert_hidden is None or e.expert_hidden >= 1, "moe.expert_hidden", e.expert_hidden, "must be >= 1 or null")
    for key, allowed in (("grouped_mm", GROUPED_MM), ("layer", LAYER_KINDS), ("overflow", OVERFLOW),
                         ("aux_loss_scope", AUX_SCOPES)):
        need(getattr(e, key) in allowed, f"moe.{key}", getattr(e, key), f"one of {', '.join(allowed)}")
    need(e.expert_granularity >= 1, "moe.expert_granularity", e.expert_granularity, "must be >= 1")
    need(cfg.base_expert_hidden % e.expert_granularity == 0, "moe.expert_granularity", e.expert_granularity,
         f"must divide the expert hidden size {cfg.base_expert_hidden}")
    ROUTERS[e.router].validate(cfg)
    if e.layer == "peer":
        pc = e.peer
        for key in ("num_keys", "heads", "top_k", "key_dim"):
            need(getattr(pc, key) >= 1, f"moe.peer.{key}", getattr(pc, key), "must be >= 1")
        need(pc.key_dim % 2 == 0, "moe.peer.key_dim", pc.key_dim, "must be even (two product-key halves)")
        need(pc.top_k <= pc.num_keys, "moe.peer.top_k", pc.top_k, f"must be <= moe.peer.num_keys={pc.num_keys}")


def _validate_sparse_updates(cfg: Config) -> None:
    """moe.peer.sparse_updates: sparse PEER table gradients + lazy AdamW (train/lazy_adam.py)."""
    e, t, p = cfg.moe, cfg.train, cfg.parallel
    if not e.peer.sparse_updates:
        return
    need(e.num_experts > 0 and e.layer == "peer", "moe.peer.sparse_updates", True,
         "needs PEER layers (moe.layer=peer, moe.num_experts > 0)")
    need(t.engine == "native", "moe.peer.sparse_updates", True,
         f"needs train.engine=native (got {t.engine}: DeepSpeed reduces dense gradients only)")
    need(not p.fsdp and p.tp == 1, "moe.peer.sparse_updates", True,
         "is supported with parallel.fsdp=false and parallel.tp=1 only")


def _validate_tp(cfg: Config) -> None:
    m, e, p = cfg.model, cfg.moe, cfg.parallel
    need(p.tp >= 1, "parallel.tp", p.tp, "must be >= 1")
    if p.tp > 1:
        need(m.n_heads % p.tp == 0, "parallel.tp", p.tp, f"must divide model.n_heads={m.n_heads}")
        need(m.kv_heads % p.tp == 0, "parallel.tp", p.tp,
             f"must divide model.n_kv_heads={m.kv_heads} (each TP rank holds whole K/V heads)")
        need(m.vocab_size % p.tp == 0, "parallel.tp", p.tp, f"must divide model.vocab_size={m.vocab_size}")
        if has_dense_layers(cfg):                  # the model has dense SwiGLU layers
            need(m.ffn_hidden % p.tp == 0, "parallel.tp", p.tp, f"must divide model.ffn_hidden={m.ffn_hidden}")
        if e.num_experts > 0 and e.layer == "moe" and e.shared_experts > 0:
            shared = cfg.base_expert_hidden * e.shared_experts
            need(shared % p.tp == 0, "parallel.tp", p.tp,
                 f"must divide the shared-expert hidden size {shared} (expert hidden x moe.shared_experts)")
    if p.etp:
        need(p.tp > 1, "parallel.etp", p.etp, "expert tensor parallelism needs parallel.tp > 1")
        need(e.num_experts > 0 and e.layer == "moe", "parallel.etp", p.etp,
             "needs routed FFN experts (moe.num_experts > 0, moe.layer=moe)")
        need(cfg.expert_hidden % p.tp == 0, "parallel.etp", p.etp,
             f"parallel.tp={p.tp} must divide the expert hidden size {cfg.expert_hidden}")


def _validate_parallel(cfg: Config) -> None:
    m, e, p = cfg.model, cfg.moe, cfg.parallel
    for key, allowed in (("backend", BACKENDS), ("fsdp_param_dtype", FSDP_DTYPES),
                         ("fsdp_reduce_dtype", FSDP_DTYPES[1:])):
        need(getattr(p, key) in allowed, f"parallel.{key}", getattr(p, key), f"one of {', '.join(allowed)}")
    need(p.grad_bucket_mb >= 0, "parallel.grad_bucket_mb", p.grad_bucket_mb,
         "must be >= 0 (0 = one all-reduce after the backward)")
    if p.backend == "nccl":
        need(cfg.train.device != "cpu", "parallel.backend", p.backend,
             "NCCL needs CUDA: use gloo (or auto) with train.device=cpu")
    if e.num_experts > 0 and e.layer == "moe" and e.grouped_mm == "grouped":
        misfit = grouped_mm_misfit(m.dim, cfg.expert_hidden // (p.tp if p.etp else 1))
        need(misfit is None, "moe.grouped_mm", e.grouped_mm,
             f"{misfit}; use moe.grouped_mm=auto (falls back to loop) or change the sizes")
    need(p.ep == "auto" or (type(p.ep) is int and p.ep >= 1), "parallel.ep", p.ep,
         "an integer >= 1, or auto (the largest that fits the world size, see parallel.ep_max)")
    need(p.ep_max is None or p.ep_max >= 1, "parallel.ep_max", p.ep_max, "must be >= 1 or null")
    need(p.dp is None or p.dp >= 1, "parallel.dp", p.dp, "must be >= 1 or null (= world / tp)")
    if p.ep == "auto":
        return                     # the ep-dependent rules run once resolve_layout has chosen one
    if e.num_experts == 0:
        need(p.ep == 1, "parallel.ep", p.ep, "a dense model (moe.num_experts=0) needs parallel.ep=1")
    elif e.layer == "peer":
        need(e.peer.num_keys ** 2 % p.ep == 0, "parallel.ep", p.ep,
             f"must divide the PEER expert count moe.peer.num_keys^2={e.peer.num_keys ** 2}")
    elif e.placement == "static":      # balanced: experts + redundant replicas fill the ranks instead
        need(e.num_experts % p.ep == 0, "parallel.ep", p.ep, f"must divide moe.num_experts={e.num_experts}")
    _validate_placement(cfg)
    if p.dp is not None:
        need(p.dp % p.ep == 0, "parallel.ep", p.ep, f"must divide parallel.dp={p.dp}")


def _validate_placement(cfg: Config) -> None:
    """moe.placement / redundant_experts / rebalance_every (moe/placement.py, parallel/replicas.py)."""
    e, p, t = cfg.moe, cfg.parallel, cfg.train
    if p.ep == "auto":
        return
    need(e.placement in PLACEMENTS, "moe.placement", e.placement, f"one of {', '.join(PLACEMENTS)}")
    need(e.redundant_experts >= 0, "moe.redundant_experts", e.redundant_experts, "must be >= 0")
    need(e.rebalance_every >= 1, "moe.rebalance_every", e.rebalance_every, "must be >= 1")
    if e.placement == "static":
        need(e.redundant_experts == 0, "moe.redundant_experts", e.redundant_experts,
             "needs moe.placement=balanced (static placement holds one replica per expert)")
        return
    need(e.num_experts > 0 and e.layer == "moe", "moe.placement", e.placement,
         "needs routed FFN experts (moe.num_experts > 0, moe.layer=moe)")
    E = e.num_ffn_experts
    if p.ep == 1:
        return        # one rank holds every expert: no placement (a balanced checkpoint resumes here as is)
    need((E + e.redundant_experts) % p.ep == 0, "moe.redundant_experts", e.redundant_experts,
         f"the {E} experts + redundant replicas must fill parallel.ep={p.ep} ranks evenly")
    need(e.redundant_experts <= E * (p.ep - 1), "moe.redundant_experts", e.redundant_experts,
         f"at most {E * (p.ep - 1)}: each of the {E} experts at most once on each of parallel.ep={p.ep} ranks")
    for bad, key, why in ((p.fsdp, "parallel.fsdp", "FSDP shards expert weights"),
                          (p.etp, "parallel.etp", "expert tensor parallelism shards expert weights"),
                          (t.engine == "deepspeed", "train.engine", "DeepSpeed owns the expert weights")):
        need(not bad, "moe.placement", e.placement, f"is not supported with {key} yet ({why}); use placement static")


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    for key, low in (("steps", 0), ("seq_len", 1), ("global_batch_size", 1), ("micro_batch_size", 1),
                     ("warmup_steps", 0), ("weight_decay", 0), ("eval_batches", 1), ("num_threads", 0)):
        need(getattr(t, key) >= low, f"train.{key}", getattr(t, key), f"must be >= {low}")
    for key, allowed in (("engine", ENGINES), ("device", DEVICES), ("precision", PRECISIONS)):
        need(getattr(t, key) in allowed, f"train.{key}", getattr(t, key), f"one of {', '.join(allowed)}")
    need(0 <= t.seed < 2 ** 63, "train.seed", t.seed, "must be between 0 and 2**63-1")
    need(t.seq_len <= cfg.model.max_seq_len, "train.seq_len", t.seq_len,
         f"must be <= model.max_seq_len={cfg.model.max_seq_len}")
    need(t.lr > 0, "train.lr", t.lr, "must be > 0")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    need(0 <= t.beta1 < 1, "train.beta1", t.beta1, "must be in [0, 1)")
    need(0 <= t.beta2 < 1, "train.beta2", t.beta2, "must be in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables)")
    need(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0 = only at the end)")
    need(t.zero_stage in ZERO_STAGES, "train.zero_stage", t.zero_stage, "one of 0, 1, 2 (engine deepspeed)")
    if t.engine == "deepspeed":
        _validate_deepspeed(cfg)
    from moetrain.train.preempt import parse_signals    # torch-free import, no cycle
    try:
        parse_signals(t.exit_signals)
    except ValueError as exc:
        raise ConfigError(f"train.exit_signals={list(t.exit_signals)!r} is not allowed: {exc}") from None


def _validate_outputs(cfg: Config) -> None:
    """data.*, checkpoint.*, logging.*"""
    need(cfg.data.source in DATA_SOURCES, "data.source", cfg.data.source, f"one of {', '.join(DATA_SOURCES)}")
    if cfg.data.source == "memmap":
        need(bool(cfg.data.path), "data.path", cfg.data.path,
             "a directory written by tools/prepare_data.py is required with data.source=memmap")
    c = cfg.checkpoint
    need(c.every >= 0, "checkpoint.every", c.every, "must be >= 0 (0 = never save)")
    need(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    need(c.snapshot_every >= 0, "checkpoint.snapshot_every", c.snapshot_every, "must be >= 0 (0 = no snapshots)")
    need(c.snapshot_every == 0 or cfg.train.engine == "native", "checkpoint.snapshot_every", c.snapshot_every,
         "needs train.engine=native (DeepSpeed does not checkpoint)")
    need(bool(c.resume), "checkpoint.resume", c.resume, "auto, none or a checkpoint path")
    need(bool(c.dir.strip()), "checkpoint.dir", c.dir, "a non-empty directory path")
    lg = cfg.logging
    need(bool(lg.dir.strip()), "logging.dir", lg.dir, "a non-empty directory path")
    need(lg.every >= 1, "logging.every", lg.every, "must be >= 1")
    need(bool(lg.run_name) and "/" not in lg.run_name and lg.run_name not in (".", ".."), "logging.run_name",
         lg.run_name, "a non-empty name without '/', not '.' or '..'")


def _usable_dir(key: str, value: str, path: str) -> None:
    """`path` is, or can become, a directory we write into: its nearest existing ancestor is a
    directory in which a (promptly removed) probe directory can be made. Every rank checks this
    before any collective, so a bad path ends every rank alike instead of rank 0 alone."""
    probe = _existing_ancestor(path)
    if not os.path.isdir(probe):
        raise ConfigError(f"{key}={value!r} is not allowed: {probe} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".moetrain-probe-", dir=probe))
    except OSError as exc:
        raise ConfigError(f"{key}={value!r} is not allowed: cannot create directories in {probe} "
                          f"({exc.strerror or type(exc).__name__})") from None


def _existing_ancestor(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def _pathconf(path: str, name: str, default: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError):
        return default
    return value if value and value > 0 else default


def _short(value: str) -> str:
    return repr(value) if len(value) <= 60 else repr(value[:40]) + f"... ({len(value)} characters)"


def _check_path_lengths(owners: list[tuple[str, str]], path: str, inside: tuple[str, int]) -> None:
    """Every component of `path` fits the filesystem's NAME_MAX, and `path`/<the longest name
    moetrain creates under it> its PATH_MAX, both read with pathconf on the nearest existing
    ancestor (bytes, as the kernel counts them). `inside`: (that name as shown, its length in
    bytes). `owners`: (key, value) pairs whose values make up `path` in order, so the message names
    the key holding the long component (the first owner for a path too long as a whole)."""
    probe = _existing_ancestor(path)
    name_max = _pathconf(probe, "PC_NAME_MAX", 255)
    path_max = _pathconf(probe, "PC_PATH_MAX", 4096)
    for key, value in owners:
        for comp in value.split(os.sep):
            size = len(os.fsencode(comp))
            if size > name_max:
                raise ConfigError(f"{key}={_short(value)} is not allowed: the name {_short(comp)} is {size} "
                                  f"bytes, over the {name_max} bytes a file name may have on the filesystem of "
                                  f"{probe} (NAME_MAX)")
    shown, inner = inside
    size = len(os.fsencode(path.rstrip(os.sep))) + 1 + inner
    if size >= path_max:           # PATH_MAX counts the terminating NUL
        key, value = owners[0]
        keys = " + ".join(k for k, _ in owners)
        raise ConfigError(f"{key}={_short(value)} is not allowed: {keys} plus the longest name moetrain creates "
                          f"inside ({shown}, {inner} bytes) make a path of {size} bytes, over the {path_max - 1} "
                          f"allowed on the filesystem of {probe} (PATH_MAX)")


HOST_NAME_MAX = 64        # TensorBoard puts the host name in its event file names; the longest one


def _longest(names: list[tuple[str, int]]) -> tuple[str, int]:
    return max(names, key=lambda n: n[1])


def _longest_run_file(cfg: Config, world_size: int) -> tuple[str, int]:
    """(name, bytes) of the longest relative path moetrain writes under
    <logging.dir>/<logging.run_name>: metrics.N.jsonl (an older metrics.jsonl moved aside),
    metrics.jsonl.tmp, config.yaml and, with TensorBoard, tb/<tag>_<i>/events.out.tfevents.
    <time>.<host>.<pid>.<n> (add_scalars makes a directory per list entry: ranks.* and
    moe.layer{l}.recv_tokens per rank, moe.layer{l}.routed/kept per expert). Host name, pid and
    counter are taken at their longest, so every rank decides alike."""
    names = [(n, len(n)) for n in ("metrics.999999.jsonl", "metrics.jsonl.tmp", "config.yaml")]
    if cfg.logging.tensorboard:
        events = len(f"events.out.tfevents.{'9' * 10}.{'h' * HOST_NAME_MAX}.{'9' * 7}.{'9' * 4}")
        last_layer = max(0, cfg.model.n_layers - 1)
        last_rank, last_expert = max(world_size, 1) - 1, max(cfg.num_router_outputs, 1) - 1
        tags = [f"ranks_a2a_dispatch_ms_{last_rank}", f"moe_layer{last_layer}_recv_tokens_{last_rank}",
                f"moe_layer{last_layer}_routed_{last_expert}"]
        names += [("tb/events.out.tfevents.<time>.<host>.<pid>.<n>", len("tb/") + events)]
        names += [(f"tb/{t}/events.out.tfevents.<time>.<host>.<pid>.<n>", len(f"tb/{t}/") + events) for t in tags]
    return _longest(names)


def _longest_checkpoint_file(cfg: Config, world_size: int) -> tuple[str, int]:
    """(name, bytes) of the longest relative path a save writes under checkpoint.dir:
    .tmp-step_NNNNNNNN/ (also .old-step_) holding manifest.json.tmp, DCP's
    [__<rank>].metadata.tmp and __<rank>_<n>.distcp, and latest.tmp (moetrain/checkpoint/store.py;
    torch/distributed/checkpoint/filesystem.py)."""
    step_dir = f".tmp-step_{max(cfg.train.steps, 99_999_999):08d}"
    last = max(world_size - 1, 0)
    names = ["latest.tmp"] + [f"{step_dir}/{n}" for n in
                              ("manifest.json.tmp", f"__{last}.metadata.tmp", f"__{last}_999.distcp")]
    return _longest([(n, len(n)) for n in names])


def check_output_dirs(cfg: Config, world_size: int = 1) -> None:
    """The run directory, and checkpoint.dir when saving is on, can be written, and the longest
    path moetrain creates in each fits the filesystem's NAME_MAX / PATH_MAX (otherwise a long
    logging.run_name fails after the model is built, a long checkpoint.dir at the first save)."""
    lg = cfg.logging
    run_dir = os.path.join(lg.dir, lg.run_name)
    _check_path_lengths([("logging.dir", lg.dir), ("logging.run_name", lg.run_name)], run_dir,
                        _longest_run_file(cfg, world_size))
    _usable_dir("logging.dir", lg.dir, run_dir)
    if cfg.checkpoint.every > 0:
        _check_path_lengths([("checkpoint.dir", cfg.checkpoint.dir)], cfg.checkpoint.dir,
                            _longest_checkpoint_file(cfg, world_size))
        _usable_dir("checkpoint.dir", cfg.checkpoint.dir, cfg.checkpoint.dir)


def _validate_deepspeed(cfg: Config) -> None:
    """train.engine=deepspeed: combinations the DeepSpeed engine (train/ds_engine.py) does not run."""
    p, c = cfg.parallel, cfg.checkpoint
    need(not p.fsdp, "parallel.fsdp", p.fsdp,
          "FSDP is part of the native engine: use train.zero_stage with train.engine=deepspeed")
    need(p.tp == 1, "parallel.tp", p.tp, "train.engine=deepspeed runs data and expert parallelism only: set parallel.tp=1")
    need(c.every == 0, "checkpoint.every", c.every,
          "train.engine=deepspeed does not checkpoint: set checkpoint.every=0 (or use train.engine=native)")
    need(c.resume == "none", "checkpoint.resume", c.resume,
          "train.engine=deepspeed does not resume from checkpoints: set checkpoint.resume=none")
    from importlib.util import find_spec
    need(find_spec("deepspeed") is not None, "train.engine", "deepspeed",
          f"the deepspeed package is not installed: pip install 'deepspeed=={DEEPSPEED_TESTED}'")
    from importlib.metadata import version
    have = version("deepspeed")
    need(_deepspeed_version_ok(have), "train.engine", "deepspeed",
          f"found deepspeed {have}, but train.engine=deepspeed is tested with {DEEPSPEED_TESTED} (0.19.x from "
          f"0.19.8 on; DeepSpeed changes its ZeRO and MoE internals between releases): "
          f"pip install 'deepspeed=={DEEPSPEED_TESTED}'")


DEEPSPEED_TESTED = "0.19.8"


def _deepspeed_version_ok(v: str) -> bool:
    nums = re.match(r"(\d+)\.(\d+)\.(\d+)", v)
    return nums is not None and (0, 19, 8) <= tuple(int(x) for x in nums.groups()) < (0, 20, 0)


def resolve_layout(cfg: Config, world_size: int) -> tuple[Config, Optional[str]]:
    """parallel.ep=auto: the config with the largest ep (<= parallel.ep_max) that every rule accepts
    at this world size: ep divides dp and the experts (num_experts + redundant_experts under
    balanced placement, the PEER rows), the router runs expert parallel, ... (validate and
    validate_layout decide). The global batch is the config's at every size (micro-steps absorb a
    smaller world). Returns (config, a note saying what was chosen); (cfg, None) for a fixed ep."""
    p = cfg.parallel
    if p.ep != "auto":
        return cfg, None
    need(world_size % p.tp == 0, "parallel.tp", p.tp, f"must divide the world size {world_size}")
    dp = p.dp if p.dp is not None else world_size // p.tp
    cap = min(dp, p.ep_max or dp)
    why = ""
    for ep in range(cap, 0, -1):
        if dp % ep:
            continue
        c = replace_keys(cfg, {"parallel.ep": ep})
        try:
            validate(c)
            validate_layout(c, world_size)
        except ConfigError as exc:
            why = str(exc)           # the last one tried (ep 1's) names what no ep can fix
            continue
        return c, (f"parallel.ep=auto: ep {ep} at world {world_size} (dp {dp}, tp {p.tp}"
                   + (f", ep_max {p.ep_max}" if p.ep_max else "") + ")")
    raise ConfigError(f"parallel.ep=auto finds no expert-parallel size for world {world_size}: {why}")


def validate_layout(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """Resolve (dp, tp, ep) against the world size; also needs no process group. parallel.ep=auto
    is resolved here too (resolve_layout; callers that build from cfg should use its config)."""
    if cfg.parallel.ep == "auto":
        cfg = resolve_layout(cfg, world_size)[0]
    p, t = cfg.parallel, cfg.train
    need(world_size % p.tp == 0, "parallel.tp", p.tp, f"must divide the world size {world_size}")
    dp = p.dp if p.dp is not None else world_size // p.tp
    need(dp * p.tp == world_size, "parallel.dp", p.dp,
          f"dp*tp must equal the world size {world_size} (tp={p.tp})")
    need(dp % p.ep == 0, "parallel.ep", p.ep, f"must divide parallel.dp={dp} (world {world_size} / tp {p.tp})")
    need(t.global_batch_size % dp == 0, "train.global_batch_size", t.global_batch_size,
          f"must be a multiple of parallel.dp={dp} (world {world_size} / tp {p.tp})")
    local = t.global_batch_size // dp
    need(local % micro_batch(cfg, dp) == 0, "train.micro_batch_size", t.micro_batch_size,
          f"must divide the per-rank batch global_batch_size/dp = {t.global_batch_size}/{dp} = {local} "
          "(or be at least it)")
    return dp, p.tp, p.ep


def micro_batch(cfg: Config, dp: int) -> int:
    """Sequences per rank per forward/backward: train.micro_batch_size, capped at the per-rank
    batch (global_batch_size / dp), so one config runs at every data-parallel width."""
    return min(cfg.train.micro_batch_size, cfg.train.global_batch_size // dp)
