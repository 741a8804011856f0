"""PEER sparse expert-table updates (moe.peer.sparse_updates): the tables' gradients are coalesced
sparse rows equal to the dense gradient on the retrieved rows; LazyAdamW updates exactly those
rows (untouched rows and their moments unchanged) with AdamW's arithmetic; one training step
(gradient norm, clipping, update) equals a lazy-AdamW reference computed densely on the touched
rows; EP / edp layouts equal world 1; a checkpoint saved at ep=2 resumes at world 1.

Shape legend: T tokens, D dim, N = num_keys^2 table rows.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from _dist import run_dist
from moetrain.config import ConfigError, load_config, validate_layout
from moetrain.data import load_token_data
from moetrain.moe.peer import PEERLayer
from moetrain.parallel.mesh import LaunchEnv, init_parallel
from moetrain.train.lazy_adam import LazyAdamW
from moetrain.train.loop import build_trainer, run_training

D, N_KEYS, HEADS, TOPK, KEY_DIM = 8, 6, 2, 3, 8

# a 2-layer PEER model (N = 64 rows per table, 2 x 4 retrieved per token)
TINY = ["model.dim=16", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "model.ffn_hidden=32",
        "moe.peer.num_keys=8", "moe.peer.heads=2", "moe.peer.top_k=4", "moe.peer.key_dim=8",
        "train.seq_len=16", "train.global_batch_size=4", "train.micro_batch_size=1", "train.steps=4",
        "train.warmup_steps=1", "train.lr=1e-2", "train.grad_clip=0.5", "train.eval_every=0",
        "train.eval_batches=1", "train.progress=false", "train.num_threads=1", "logging.every=1",
        "logging.tensorboard=false", "checkpoint.every=0", "train.device=cpu"]


def _cfg(extra=(), sparse=True):
    return load_config("configs/peer.yaml", TINY + [f"moe.peer.sparse_updates={str(sparse).lower()}"] + list(extra))


def _make_peer(seed=0, dense_scoring=False, sparse=False):
    layer = PEERLayer(D, N_KEYS, HEADS, TOPK, KEY_DIM, query_bn=True).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 + (name == "query_bn.weight"))
    layer.dense_scoring = dense_scoring
    layer.sparse_grads = sparse
    return layer


# ---- sparse gradients -------------------------------------------------------------------------

@pytest.mark.parametrize("dense_scoring", [False, True], ids=["gather_rows", "score_all_rows"])
def test_sparse_table_grads_equal_dense_grads_on_retrieved_rows(dense_scoring):
    dense = _make_peer(dense_scoring=dense_scoring)
    sparse = copy.deepcopy(dense)
    sparse.sparse_grads = True
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for _ in range(2):                      # two micro-steps: autograd adds the sparse gradients
        (dense(x) * G).sum().backward()
        (sparse(x) * G).sum().backward()
    _, ids = sparse.retrieve(x.reshape(-1, D))
    touched = torch.unique(ids)
    assert touched.numel() < sparse.num_experts        # some rows untouched: the test means something
    for name, p in sparse.named_parameters():
        want = dict(dense.named_parameters())[name].grad
        if name.startswith("expert_"):
            g = p.grad.coalesce()
            assert p.grad.is_sparse and torch.equal(g.indices()[0], touched), name
            torch.testing.assert_close(g.to_dense(), want, rtol=1e-12, atol=1e-13, msg=name)
            untouched = torch.ones(sparse.num_experts, dtype=torch.bool)
            untouched[touched] = False
            assert torch.all(want[untouched] == 0), name
        else:
            torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-13, msg=name)


def test_sharded_table_gets_only_its_own_rows():
    """A table shard (rows [32, 64) of 64, as on EP rank 1) gets a sparse gradient over the
    retrieved rows it holds only, in its local numbering."""
    layer = PEERLayer(16, 8, 2, 4, 8).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    layer.sparse_grads = True
    layer.dense_scoring = False
    x = torch.randn(10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, ids = layer.retrieve(x)
    layer.shard_(32, 32)
    w, ids = layer.retrieve(x)
    layer._experts(x, w, ids).sum().backward()
    mine = ids[(ids >= 32)] - 32
    for p in (layer.expert_down, layer.expert_up):
        assert p.grad.is_sparse and torch.equal(p.grad.coalesce().indices()[0], torch.unique(mine))


# ---- LazyAdamW --------------------------------------------------------------------------------

def _lazy_reference(p, m, v, step, rows, g_rows, lr, wd, b1, b2, eps):
    """Lazy AdamW computed densely: every row through AdamW's formula, then only rows in `rows`
    kept (weights and both moments); the others keep their old values."""
    mask = torch.zeros(p.shape[0], dtype=torch.bool)
    mask[rows] = True
    g = torch.zeros_like(p)
    g[rows] = g_rows
    m2 = m * b1 + (1 - b1) * g
    v2 = v * b2 + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    p2 = p * (1 - lr * wd) - lr / bc1 * m2 / (v2.sqrt() / bc2 ** 0.5 + eps)
    keep = mask[:, None]
    return torch.where(keep, p2, p), torch.where(keep, m2, m), torch.where(keep, v2, v)


def test_lazy_adamw_updates_exactly_the_touched_rows():
    gen = torch.Generator().manual_seed(5)
    N, Dd = 40, 6
    table = torch.nn.Parameter(torch.randn(N, Dd, generator=gen))
    dense = torch.nn.Parameter(torch.randn(5, Dd, generator=gen))
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = LazyAdamW([table, dense], **kw)
    ref_dense = torch.nn.Parameter(dense.detach().clone())
    ref_opt = torch.optim.AdamW([ref_dense], foreach=False, **kw)
    m = torch.zeros(N, Dd)
    v = torch.zeros(N, Dd)
    p_ref = table.detach().clone()
    for step in range(1, 5):
        rows = torch.randperm(N, generator=gen)[:7].sort().values
        g_rows = torch.randn(7, Dd, generator=gen)
        table.grad = torch.sparse_coo_tensor(rows[None], g_rows, (N, Dd), check_invariants=True)
        dense.grad = torch.randn(5, Dd, generator=gen)
        ref_dense.grad = dense.grad.clone()
        before = table.detach().clone()
        m_before = opt.state[table]["exp_avg"].clone() if step > 1 else None
        opt.step()
        ref_opt.step()
        p_ref, m, v = _lazy_reference(p_ref, m, v, step, rows, g_rows, kw["lr"], kw["weight_decay"], 0.9, 0.95, 1e-8)
        st = opt.state[table]
        torch.testing.assert_close(table.detach(), p_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(st["exp_avg"], m, rtol=0, atol=1e-6)
        torch.testing.assert_close(st["exp_avg_sq"], v, rtol=0, atol=1e-6)
        assert float(st["step"]) == step
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(table.detach()[untouched], before[untouched])          # not decayed either
        if m_before is not None:
            assert torch.equal(st["exp_avg"][untouched], m_before[untouched])     # moments not decayed
        assert torch.equal(dense.detach(), ref_dense.detach())                    # dense grads: AdamW


def test_lazy_adamw_with_every_row_touched_is_adamw_bitwise():
    gen = torch.Generator().manual_seed(6)
    a = torch.nn.Parameter(torch.randn(12, 4, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    lazy, ref = LazyAdamW([a], **kw), torch.optim.AdamW([b], foreach=False, **kw)
    for _ in range(3):
        g = torch.randn(12, 4, generator=gen)
        a.grad, b.grad = g.to_sparse(sparse_dim=1), g.clone()
        lazy.step()
        ref.step()
        assert torch.equal(a.detach(), b.detach())
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(lazy.state[a][k], ref.state[b][k]), k


# ---- one training step against the reference --------------------------------------------------

def _trainer(cfg):
    par = init_parallel(1, 1, 1, LaunchEnv(0, 1, 0, 1, "single"), "cpu")
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    return build_trainer(cfg, par, data)


@pytest.mark.parametrize("num_keys", [12, 32], ids=["score_all_rows_N144", "gather_rows_N1024"])
def test_training_steps_equal_lazy_adamw_reference_computed_densely(num_keys):
    """Three steps of the sparse trainer (gradient norm with the sparse rows, clipping at 0.5,
    LazyAdamW) equal: the dense trainer's gradients, its global norm and clipping, AdamW for all
    non-table parameters and the lazy rule applied densely to the rows retrieved in the step."""
    from moetrain.parallel.grads import clip_grad_norm
    torch.set_num_threads(1)
    keys = [f"moe.peer.num_keys={num_keys}"]
    sparse = _trainer(_cfg(keys, sparse=True))
    ref = _trainer(_cfg(keys, sparse=False))
    peers = [b.ffn for b in ref.model.layers if isinstance(b.ffn, PEERLayer)]
    touched = {id(layer): [] for layer in peers}
    for layer in peers:
        orig = layer.retrieve

        def spy(x, _orig=orig, _layer=layer):
            w, ids = _orig(x)
            touched[id(_layer)].append(ids.reshape(-1))
            return w, ids
        layer.retrieve = spy
    tables = {id(getattr(layer, n)): (layer, n) for layer in peers for n in ("expert_down", "expert_up")}
    moments = {k: (torch.zeros_like(getattr(lay, n)), torch.zeros_like(getattr(lay, n)))
               for k, (lay, n) in tables.items()}
    t = ref.cfg.train
    from moetrain.train.lr import lr_at
    from moetrain.train.optim import set_lr
    clipped = 0
    for step in range(3):
        out = sparse.train_step(step)
        for v in touched.values():
            v.clear()
        set_lr(ref.opt, lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio))
        ref.compute_gradients(step)
        norm = clip_grad_norm(ref.dense_params, ref.expert_params, t.grad_clip, None, 1)
        clipped += norm > t.grad_clip
        torch.testing.assert_close(float(out[3]), norm, rtol=1e-6, atol=0)        # norm counts sparse rows once
        grads = {k: getattr(lay, n).grad for k, (lay, n) in tables.items()}
        for k, (lay, n) in tables.items():
            getattr(lay, n).grad = None          # AdamW skips them: the reference below updates them
        ref.opt.step()
        ref.opt.zero_grad(set_to_none=True)
        group = ref.opt.param_groups[0]
        with torch.no_grad():
            for k, (lay, n) in tables.items():
                p = getattr(lay, n)
                rows = torch.unique(torch.cat(touched[id(lay)]))
                assert 0 < rows.numel() < p.shape[0]
                m, v = moments[k]
                p2, m2, v2 = _lazy_reference(p.detach(), m, v, step + 1, rows, grads[k][rows], group["lr"],
                                             group["weight_decay"], t.beta1, t.beta2, 1e-8)
                p.copy_(p2)
                moments[k] = (m2, v2)
        for (name, a), (_, b) in zip(sparse.model.named_parameters(), ref.model.named_parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6, msg=f"step {step + 1} {name}")
    assert clipped >= 1                          # clipping was exercised


# ---- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,needle", [
    (["moe.layer=moe"], "needs PEER layers"),
    (["moe.num_experts=0", "moe.layer=moe"], "needs PEER layers"),
    (["train.engine=deepspeed"], "train.engine=native"),
    (["parallel.tp=2"], "parallel.tp=1"),
])
def test_bad_sparse_updates_config_is_one_line(extra, needle):
    with pytest.raises(ConfigError) as e:
        _cfg(extra)
    msg = str(e.value)
    assert "moe.peer.sparse_updates" in msg and needle in msg and "\n" not in msg


# ---- layouts and checkpoints (gloo, 2 ranks) ----------------------------------------------------

def _row_sum_body(rank, world):
    import torch.distributed as dist
    from moetrain.parallel.grads import SparseRowSum
    dist.init_process_group("gloo", rank=rank, world_size=world)
    p = torch.nn.Parameter(torch.zeros(10, 3))
    a = torch.nn.Parameter(torch.zeros(10, 3))       # no gradient on rank 1: joins with nothing
    b = torch.nn.Parameter(torch.zeros(10, 3))       # no gradient anywhere
    if rank == 0:
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 7, 1]]), torch.ones(3, 3), (10, 3))   # row 1 twice
        a.grad = torch.sparse_coo_tensor(torch.tensor([[4]]), torch.full((1, 3), 2.0), (10, 3))
    else:
        p.grad = torch.sparse_coo_tensor(torch.tensor([[7, 2]]), torch.full((2, 3), 10.0), (10, 3))
    SparseRowSum([p, a, b], dist.group.WORLD, world).finish()
    return [(t.grad.is_coalesced(), t.grad.indices()[0].tolist(), t.grad.values()[:, 0].tolist()) for t in (p, a, b)]


def test_sparse_row_sum_over_edp_adds_rows_of_every_rank():
    out = run_dist(_row_sum_body, 2)
    want = [(True, [1, 2, 7], [2.0, 10.0, 11.0]), (True, [4], [2.0]), (True, [], [])]
    assert out == [want, want]


def _losses(log_dir, run_name="peer"):
    out = {}
    with open(os.path.join(log_dir, run_name, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def _train(rank, world, log_dir, extra):
    torch.set_num_threads(1)
    cfg = _cfg([f"logging.dir={log_dir}"] + list(extra))
    dp, tp, ep = validate_layout(cfg, world)
    env = LaunchEnv(rank, world, rank, world, "torchrun") if world > 1 else LaunchEnv(0, 1, 0, 1, "single")
    par = init_parallel(dp, tp, ep, env, "cpu")
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    run_training(cfg, par, data, log=lambda m: None)
    return _losses(log_dir) if rank == 0 else None


@pytest.mark.parametrize("world,extra", [(2, ["parallel.ep=2"]), (2, ["parallel.ep=1"]),
                                         (2, ["parallel.ep=2", "moe.peer.num_keys=32"]),
                                         (2, ["parallel.ep=1", "moe.peer.num_keys=32"]),
                                         (4, ["parallel.ep=2", "moe.peer.num_keys=32"])],
                         ids=["ep2", "dp2_edp2", "ep2_N1024", "dp2_edp2_N1024", "ep2_edp2_N1024"])
def test_sparse_layouts_equal_world1(tmp_path, world, extra):
    """ep=2: each table shard gets its own rows; ep=1 at world 2: the sparse rows are summed over
    edp=2 by the all-gather (SparseRowSum); world 4 with ep=2: both (each shard's rows summed over
    its edp=2 pair). N=64 scores all rows, N=1024 gathers (rows untouched)."""
    want = _train(0, 1, str(tmp_path / "w1"), [e for e in extra if "num_keys" in e])
    got = run_dist(_train, world, (str(tmp_path / "w2"), extra))[0]
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([got[s] for s in sorted(got)]),
                               torch.tensor([want[s] for s in sorted(want)]), rtol=2e-5, atol=0)


def test_sparse_checkpoint_saved_at_ep2_resumes_at_world1(tmp_path):
    """Steps 3-4 of an ep=2 run equal steps 3-4 of world 1 resumed from its step-2 checkpoint
    (weights and lazy-Adam moments, stored by parameter FQN, row-sharded tables regathered)."""
    ckpt = str(tmp_path / "ckpt")
    full = run_dist(_train, 2, (str(tmp_path / "ep2"), ["parallel.ep=2", f"checkpoint.dir={ckpt}",
                                                         "checkpoint.every=2", "checkpoint.keep_last=5"]))[0]
    resumed = _train(0, 1, str(tmp_path / "w1"), [f"checkpoint.dir={str(tmp_path / 'ckpt_w1')}",
                                                  f"checkpoint.resume={ckpt}/step_00000002"])
    assert sorted(resumed) == [3, 4]
    torch.testing.assert_close(torch.tensor([resumed[3], resumed[4]]), torch.tensor([full[3], full[4]]),
                               rtol=2e-5, atol=0)


def test_peer_1m_config_is_a_million_experts_with_sparse_updates_and_trains(tmp_path):
    """configs/peer_1m.yaml as shipped: N = 1024^2 rows per table, sparse updates on; two steps of
    it with the table shrunk to N = 32^2 (the full one is 1.07B parameters) and a small batch."""
    cfg = load_config("configs/peer_1m.yaml", [])
    assert cfg.moe.layer == "peer" and cfg.moe.peer.num_keys ** 2 == 1024 ** 2 and cfg.moe.peer.sparse_updates
    assert validate_layout(load_config("configs/peer_1m.yaml", ["parallel.ep=2"]), 2) == (2, 1, 2)
    torch.set_num_threads(1)
    small = ["moe.peer.num_keys=32", "train.steps=2", "train.global_batch_size=2", "train.micro_batch_size=1",
             "train.seq_len=32", "train.eval_every=0", "train.progress=false", "logging.tensorboard=false",
             f"logging.dir={tmp_path}", "train.device=cpu"]
    cfg = load_config("configs/peer_1m.yaml", small)
    par = init_parallel(1, 1, 1, LaunchEnv(0, 1, 0, 1, "single"), "cpu")
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    trainer = run_training(cfg, par, data, log=lambda m: None).trainer
    assert isinstance(trainer.opt, LazyAdamW) and trainer.state.step == 2

