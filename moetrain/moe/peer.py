"""PEER (He 2024, "Mixture of A Million Experts"): N = n^2 single-neuron experts
e_i(x) = gelu(u_i . x) v_i, retrieved by product keys.

Per head h: query q = BN(W_q x) split in halves q1, q2; scores s1 = q1 K1^T, s2 = q2 K2^T over
two sub-key tables of n keys; take the top-k of each half, then the top-k of the k*k candidate
sums s1[i] + s2[j] (expert id i*n + j). That equals the top-k over all n^2 full keys, at cost
O(n) = O(sqrt N) per token instead of O(N). Weights = softmax over the k scores; heads share
the expert pool and their outputs are summed.

Expert tables can be sharded over an EP group (rank r holds rows [r*N/ep, (r+1)*N/ep)): tokens
and their retrieved ids are all-gathered in the group, each rank adds the contributions of the
rows it holds, and a reduce-scatter returns every rank its own tokens' sums (the collectives:
dispatch.RowShardDispatcher, installed by apply_ep). Retrieval (queries, keys) stays replicated.

Sparse table gradients (`sparse_grads`, config moe.peer.sparse_updates): the expert tables'
gradients are coalesced sparse COO tensors over the rows the batch retrieved (of the rows held
here), so the backward costs O(tokens x retrieved rows), not O(N); the optimizer then updates only
those rows (train/lazy_adam.py). The forward math is the same as with dense gradients.

Shape legend: T tokens, D dim, H heads, K retrieved experts per head, n sub-keys, N = n^2.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Score every local row with one GEMM (instead of gathering H*K rows of u and v per token) while
# the local table has at most this many rows per retrieved expert (H*K). 2-core CPU, T=2048,
# D=128, H*K=128: N=2304 (18 rows per pick) fwd+bwd 208 ms dense vs 771 ms gathered; the gather
# path's cost does not grow with N, so large tables (PEER's point) always gather.
DENSE_SCORING_MAX_ROWS_PER_PICK = 32


def product_key_topk(q1_THd: torch.Tensor, q2_THd: torch.Tensor, keys1_Hnd: torch.Tensor,
                     keys2_Hnd: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores_THK, expert_ids_THK): top-k of s1[i] + s2[j] over all (i, j), via k x k candidates."""
    n = keys1_Hnd.shape[1]
    s1 = torch.einsum("thd,hnd->thn", q1_THd, keys1_Hnd)
    s2 = torch.einsum("thd,hnd->thn", q2_THd, keys2_Hnd)
    v1, i1 = torch.topk(s1, k, dim=-1)
    v2, i2 = torch.topk(s2, k, dim=-1)
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)          # [T, H, k*k]
    scores, flat = torch.topk(cand, k, dim=-1)
    ids = i1.gather(-1, flat // k) * n + i2.gather(-1, flat % k)
    return scores, ids


class PEERLayer(nn.Module):
    def __init__(self, dim: int, num_keys: int, heads: int, top_k: int, key_dim: int, query_bn: bool = True):
        super().__init__()
        self.dim, self.num_keys, self.heads, self.top_k, self.key_dim = dim, num_keys, heads, top_k, key_dim
        self.num_experts = num_keys * num_keys
        self.query = nn.Linear(dim, heads * key_dim, bias=False)
        # batch statistics in training AND eval (no running averages): a micro batch holds the same
        # sequences under every layout, so this keeps PEER layout-deterministic, while running
        # averages would depend on which micro batches each rank happened to see
        self.query_bn = nn.BatchNorm1d(heads * key_dim, affine=True, track_running_stats=False) if query_bn else None
        self.keys1 = nn.Parameter(torch.empty(heads, num_keys, key_dim // 2))
        self.keys2 = nn.Parameter(torch.empty(heads, num_keys, key_dim // 2))
        self.expert_down = nn.Parameter(torch.empty(self.num_experts, dim))   # u_i
        self.expert_up = nn.Parameter(torch.empty(self.num_experts, dim))     # v_i
        self.row_offset = 0            # global id of local row 0 (EP sharding)
        self.dispatcher = None         # dispatch.RowShardDispatcher when the tables are sharded
        self.dense_scoring = None      # None = by table size (DENSE_SCORING_MAX_ROWS_PER_PICK)
        self.sparse_grads = False      # expert tables get sparse (rows, values) gradients

    def shard_(self, offset: int, count: int) -> None:
        for name in ("expert_down", "expert_up"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.detach()[offset:offset + count].clone()))
        self.row_offset = offset

    def retrieve(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = x_TD.shape[0]
        q = self.query(x_TD)
        if self.query_bn is not None:
            q = self.query_bn(q)
        q = q.view(T, self.heads, 2, self.key_dim // 2)
        scores, ids = product_key_topk(q[:, :, 0], q[:, :, 1], self.keys1, self.keys2, self.top_k)
        return torch.softmax(scores.float(), dim=-1).to(x_TD.dtype), ids

    def _experts(self, x_TD, w_THK, ids_THK):
        """sum_h sum_k w * gelu(u_id . x) v_id over the rows held here (others contribute 0)."""
        local = ids_THK - self.row_offset
        rows = self.expert_down.shape[0]
        mine = (local >= 0) & (local < rows)
        local = local.clamp(0, rows - 1)
        dense = self.dense_scoring
        if dense is None:
            dense = rows <= DENSE_SCORING_MAX_ROWS_PER_PICK * self.heads * self.top_k
        if dense:
            return self._experts_dense(x_TD, w_THK, local, mine)
        if self.sparse_grads:      # table gradients: sparse over the retrieved rows held here
            u = gather_rows_sparse_grad(self.expert_down, local, mine)   # [T, H, K, D]
            v = gather_rows_sparse_grad(self.expert_up, local, mine)
        else:
            u = F.embedding(local, self.expert_down)
            v = F.embedding(local, self.expert_up)
        a = F.gelu(torch.einsum("thkd,td->thk", u, x_TD)) * w_THK * mine
        return torch.einsum("thk,thkd->td", a, v)

    def _experts_dense(self, x_TD, w_THK, local_THK, mine_THK):
        """Same sum through two GEMMs over all local rows: u . x for every row, then the retrieved
        (token, row) weights scattered into a [T, rows] matrix times the v table. Cheaper than
        gathering H*K rows of u and v per token while the table is small (see module constant)."""
        T = x_TD.shape[0]
        flat = local_THK.reshape(T, -1)
        down, up = self.expert_down, self.expert_up
        if self.sparse_grads:       # small tables: dense GEMMs, the gradients cut to the retrieved rows
            touched = local_THK[mine_THK]     # sync ok: sparse gradients have a data-dependent size
            down, up = SparsifyRowGrad.apply(down, touched), SparsifyRowGrad.apply(up, touched)
        s_TR = x_TD @ down.t()
        a = F.gelu(s_TR.gather(1, flat)) * (w_THK * mine_THK).reshape(T, -1)
        coef_TR = torch.zeros_like(s_TR).scatter_add(1, flat, a)        # repeats of a row add up
        return coef_TR @ up

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        w, ids = self.retrieve(x_TD)
        if self.dispatcher is None:
            return self._experts(x_TD, w, ids).view(B, S, D)
        xs, ws, ids_all = self.dispatcher.dispatch(x_TD, w, ids)
        return self.dispatcher.combine(self._experts(xs, ws, ids_all), x_TD).view(B, S, D)


def sparse_row_sum(rows_M: torch.Tensor, values_MD: torch.Tensor, shape) -> torch.Tensor:
    """The [R, D] tensor sum_m e_{rows[m]} values[m]^T as a coalesced sparse COO tensor: one entry
    per distinct row (sorted), repeated rows added."""
    uniq, inv = torch.unique(rows_M, sorted=True, return_inverse=True)
    vals = values_MD.new_zeros((uniq.shape[0],) + tuple(values_MD.shape[1:])).index_add_(0, inv, values_MD)
    return torch.sparse_coo_tensor(uniq.unsqueeze(0), vals, tuple(shape), is_coalesced=True, check_invariants=False)


class _GatherRowsSparseGrad(torch.autograd.Function):
    """table[rows] (any index shape), whose gradient for the table is sparse over the gathered rows
    where keep is true (the rows held here; the others were clamped stand-ins with weight 0)."""

    @staticmethod
    def forward(ctx, table_RD, rows, keep):
        ctx.save_for_backward(rows, keep)
        ctx.table_shape = table_RD.shape
        return table_RD.index_select(0, rows.reshape(-1)).view(*rows.shape, table_RD.shape[1])

    @staticmethod
    def backward(ctx, grad):
        rows, keep = ctx.saved_tensors
        # sync ok: a sparse gradient's size is the number of rows retrieved (data dependent)
        flat_keep = keep.reshape(-1)
        vals = grad.reshape(-1, grad.shape[-1])[flat_keep]
        return sparse_row_sum(rows.reshape(-1)[flat_keep], vals, ctx.table_shape), None, None


def gather_rows_sparse_grad(table_RD: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return _GatherRowsSparseGrad.apply(table_RD, rows, keep)


class SparsifyRowGrad(torch.autograd.Function):
    """Identity on the table; its (dense) gradient is handed back as a sparse tensor over the
    distinct `rows` only. For the dense-scoring path, where every untouched row's gradient is
    exactly zero anyway: the optimizer then sees the same touched rows as on the gather path."""

    @staticmethod
    def forward(ctx, table_RD, rows):
        ctx.save_for_backward(rows)
        return table_RD.view_as(table_RD)

    @staticmethod
    def backward(ctx, grad_RD):
        (rows,) = ctx.saved_tensors
        uniq = torch.unique(rows.reshape(-1), sorted=True)
        return torch.sparse_coo_tensor(uniq.unsqueeze(0), grad_RD.index_select(0, uniq), grad_RD.shape,
                                       is_coalesced=True, check_invariants=False), None


def brute_force_topk(q1_THd, q2_THd, keys1_Hnd, keys2_Hnd, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: score all n^2 full keys [k1_i, k2_j] and take the top-k (tests use this)."""
    n = keys1_Hnd.shape[1]
    s1 = torch.einsum("thd,hnd->thn", q1_THd, keys1_Hnd)
    s2 = torch.einsum("thd,hnd->thn", q2_THd, keys2_Hnd)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).reshape(*s1.shape[:2], n * n)
    return torch.topk(full, k, dim=-1)

