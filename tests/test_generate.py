"""Text generation (moetrain/generate.py, tools/generate.py): the KV cache reproduces the full
forward to 1e-5 in fp32 (dense, top-k MoE, shared experts, MoE++ with aux-free routing, GShard,
noisy top-k with jitter, PEER without query batch norm, grouped-query and multi-query attention
with a dense first layer), the logit filters on hand-made logits,
seeded and greedy sampling, non-per-token models (expert choice, PEER query batch norm, capacity)
fall back to the full prefix, a checkpoint trained at ep=2 generates in one process, and bad
input is one line with exit code 2 (1 for a damaged checkpoint)."""
from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _dist import run_dist

from moetrain import growth
from moetrain.checkpoint.convert import write_sharded
from moetrain.config import load_config, validate_layout
from moetrain.data import load_token_data
from moetrain.generate import (GenerateError, KVCache, filter_logits, generate, inference_config, noncausal_reason,
                               sample_next)
from moetrain.parallel.mesh import LaunchEnv, init_parallel
from moetrain.train.loop import run_training
from _tools import load_tool

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = str(REPO / "configs/tiny_cpu.yaml")
# init_std 0.15: attention far from uniform (a wrong mask or position shows in the logits) while
# fp32 rounding stays well under the 1e-5 bound (logits std ~0.8; at 0.3 it reaches ~2e-5)
BASE = ["model.dim=32", "model.n_layers=3", "model.n_heads=2", "model.max_seq_len=48", "model.ffn_hidden=64",
        "model.init_std=0.15", "train.seq_len=32", "train.device=cpu", "moe.capacity_factor=null"]
KINDS = {
    "dense": ["moe.num_experts=0"],
    "moe_topk": ["moe.num_experts=4", "moe.top_k=2", "moe.router=topk"],
    "shared_experts": ["moe.num_experts=4", "moe.top_k=2", "moe.shared_experts=1", "moe.every=2"],
    "moe_pp_aux_free": ["moe.num_experts=4", "moe.top_k=2", "moe.router=aux_free", "moe.gated_residual=true",
                        "moe.zero_experts.zero=1", "moe.zero_experts.copy=1", "moe.zero_experts.constant=1"],
    # random at training time, deterministic per token in eval mode
    "gshard": ["moe.num_experts=4", "moe.top_k=2", "moe.router=gshard"],
    "noisy_topk_jitter": ["moe.num_experts=4", "moe.top_k=2", "moe.router=noisy_topk", "moe.router_jitter=0.1"],
    # grouped-query attention (the cache holds the 2 K/V heads), a dense first layer, multi-query
    "gqa_first_dense": ["model.n_heads=4", "model.n_kv_heads=2", "moe.num_experts=4", "moe.top_k=2",
                        "moe.first_dense_layers=1"],
    "mqa_dense": ["model.n_heads=4", "model.n_kv_heads=1", "moe.num_experts=0"],
    "peer": ["moe.num_experts=4", "moe.layer=peer", "moe.peer.num_keys=6", "moe.peer.heads=2", "moe.peer.top_k=3",
             "moe.peer.key_dim=8", "moe.peer.query_bn=false"],
}


def _model(extra: list[str], seed: int = 7):
    cfg = load_config(TINY_YAML, BASE + extra)
    return growth.build_model(cfg, seed=seed)


def _tool():
    return load_tool("generate")


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cache_matches_full_forward(kind):
    """Prefill 5 tokens, a chunk of 3 (the offset causal mask), then one token at a time: every
    position's logits equal the full forward's over the whole sequence."""
    torch.manual_seed(0)
    model = _model(KINDS[kind])
    assert noncausal_reason(model) is None
    L = model.cfg.model.max_seq_len
    ids = torch.randint(0, model.cfg.model.vocab_size, (2, L))
    with torch.no_grad():
        full, _ = model(ids)
        cache = KVCache(len(model.layers), L)
        parts = [model(ids[:, :5], cache)[0], model(ids[:, 5:8], cache)[0]]
        parts += [model(ids[:, t:t + 1], cache)[0] for t in range(8, L)]
    inc = torch.cat(parts, dim=1)
    assert cache.pos == L
    diff = (inc - full).abs().max().item()
    assert diff <= 1e-5, diff
    assert full.std() > 0.5          # the logits are not trivially flat


def test_gqa_cache_holds_the_kv_heads_once():
    """The cache stores n_kv_heads heads per layer (not n_heads): [B, K, max_len, Dh]."""
    model = _model(KINDS["gqa_first_dense"])
    L = model.cfg.model.max_seq_len
    cache = KVCache(len(model.layers), L)
    with torch.no_grad():
        model(torch.zeros(3, 4, dtype=torch.long), cache)
    for layer in cache.layers:
        assert tuple(layer.k.shape) == tuple(layer.v.shape) == (3, 2, L, 8)
    assert [b.is_moe for b in model.layers] == [False, True, True]


def test_cache_refuses_positions_past_max_seq_len():
    model = _model(KINDS["dense"])
    L = model.cfg.model.max_seq_len
    cache = KVCache(len(model.layers), L)
    with torch.no_grad():
        model(torch.zeros(1, L - 1, dtype=torch.long), cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="position 48 is beyond model.max_seq_len=48"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)
    assert cache.pos == L


# ----------------------------------------------------------------------------- filtering and sampling


def _kept(logits) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_filter_logits_by_hand():
    x = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert torch.equal(filter_logits(x, 2.0), x / 2)                       # temperature only
    assert _kept(filter_logits(x, 1.0, top_k=2)) == [0, 1]
    assert torch.equal(filter_logits(x, 1.0, top_k=2)[:2], x[:2])
    assert _kept(filter_logits(x, 1.0, top_k=4)) == [0, 1, 2, 3]
    assert _kept(filter_logits(torch.tensor([1.0, 3.0, 3.0, 0.0]), 1.0, top_k=1)) == [1, 2]   # ties kept
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert _kept(filter_logits(p, 1.0, top_p=0.4)) == [0]                  # the top token always stays
    assert _kept(filter_logits(p, 1.0, top_p=0.6)) == [0, 1]
    assert _kept(filter_logits(p, 1.0, top_p=0.9)) == [0, 1, 2]
    assert _kept(filter_logits(p, 1.0, top_p=1.0)) == [0, 1, 2, 3]
    # order: top-k first, then top-p over the renormalized survivors (.526, .316, .158): the third
    # token's preceding mass is .842 >= .82, so it goes; top-p first would have kept it (.8 < .82)
    assert _kept(filter_logits(p, 1.0, top_k=3, top_p=0.82)) == [0, 1]
    # temperature before top-p: a hot distribution needs more tokens to reach p
    assert _kept(filter_logits(p, 10.0, top_p=0.6)) == [0, 1, 2]
    # a permuted input keeps the same tokens (the scatter back from sorted order)
    perm = torch.tensor([2, 0, 3, 1])
    assert _kept(filter_logits(p[perm], 1.0, top_p=0.6)) == [1, 3]


@pytest.mark.parametrize("kw", [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": -1},
                                {"top_p": 0.0}, {"top_p": 1.5}])
def test_filter_logits_refuses_bad_settings(kw):
    args = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
    with pytest.raises(GenerateError):
        filter_logits(torch.zeros(4), **args)


def test_sample_next_greedy_and_top1():
    x = torch.tensor([0.1, 2.0, -1.0, 1.9])
    g = torch.Generator().manual_seed(0)
    assert sample_next(x, 0.0, 0, 1.0, g) == 1
    assert {sample_next(x, 5.0, 1, 1.0, g) for _ in range(20)} == {1}
    assert len({sample_next(x, 5.0, 0, 1.0, g) for _ in range(50)}) > 1


def test_same_seed_same_tokens_and_greedy_is_the_argmax_chain():
    model = _model(KINDS["moe_topk"])
    prompt = [5, 17, 99]
    a = generate(model, prompt, 20, temperature=1.0, top_k=50, top_p=0.95, seed=3)
    b = generate(model, prompt, 20, temperature=1.0, top_k=50, top_p=0.95, seed=3)
    c = generate(model, prompt, 20, temperature=1.0, top_k=50, top_p=0.95, seed=4)
    assert a.used_cache and a.new_ids == b.new_ids and a.new_ids != c.new_ids
    greedy = generate(model, prompt, 20, temperature=0.0)
    ids = list(prompt)
    with torch.no_grad():
        for tok in greedy.new_ids:
            assert tok == int(model(torch.tensor([ids]))[0][0, -1].argmax())
            ids.append(tok)
    assert generate(model, prompt, 20, temperature=0.0, use_cache=False).new_ids == greedy.new_ids


def test_stop_at_eod_and_vocab_limit():
    model = _model(KINDS["dense"])
    greedy = generate(model, [1, 2, 3], 10, temperature=0.0)
    eod = greedy.new_ids[2]
    first = greedy.new_ids.index(eod)
    stopped = generate(model, [1, 2, 3], 10, temperature=0.0, eod_id=eod)
    assert stopped.stop == "eod" and stopped.new_ids == greedy.new_ids[:first + 1]
    assert generate(model, [1, 2, 3], 10, temperature=0.0, eod_id=eod, stop_at_eod=False).new_ids == greedy.new_ids
    limited = generate(model, [1, 2, 3], 30, temperature=1.0, vocab_limit=10, seed=1)
    assert max(limited.new_ids) < 10


def test_generate_refuses_bad_requests():
    model = _model(KINDS["dense"])
    L = model.cfg.model.max_seq_len
    with pytest.raises(GenerateError, match="max_seq_len"):
        generate(model, [1] * (L - 3), 4)
    with pytest.raises(GenerateError, match="vocabulary"):
        generate(model, [1, 256], 4)
    with pytest.raises(GenerateError, match="no tokens"):
        generate(model, [], 4)
    model.train()
    with pytest.raises(GenerateError, match="training mode"):
        generate(model, [1], 4)


# ----------------------------------------------------------------------------- non-per-token models


@pytest.mark.parametrize("extra", [
    ["moe.num_experts=4", "moe.top_k=2", "moe.router=expert_choice", "moe.capacity_factor=1.0"],
    ["moe.num_experts=4", "moe.layer=peer", "moe.peer.num_keys=6", "moe.peer.heads=2", "moe.peer.top_k=3",
     "moe.peer.key_dim=8", "moe.peer.query_bn=true"],
    ["moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=1.0"],
], ids=["expert_choice", "peer_query_bn", "capacity"])
def test_noncausal_models_recompute_the_prefix(extra):
    model = _model(extra)
    reason = noncausal_reason(model)
    assert reason
    g = generate(model, [3, 1, 4, 1, 5], 6, temperature=0.0)
    assert not g.used_cache and len(g.notes) == 1 and reason in g.notes[0]
    ids = [3, 1, 4, 1, 5]
    with torch.no_grad():
        for tok in g.new_ids:
            assert tok == int(model(torch.tensor([ids]))[0][0, -1].argmax())
            ids.append(tok)
    with pytest.raises(GenerateError, match="cannot reproduce"):
        generate(model, [3, 1], 2, use_cache=True)


def test_inference_config_makes_token_choice_dropless():
    cfg = load_config(TINY_YAML, BASE + ["moe.num_experts=4", "moe.capacity_factor=1.25"])
    out, notes = inference_config(cfg)
    assert out.moe.capacity_factor is None and len(notes) == 1 and "1.25" in notes[0]
    assert noncausal_reason(growth.build_model(out, seed=1)) is None
    ec = load_config(TINY_YAML, BASE + ["moe.num_experts=4", "moe.router=expert_choice", "moe.capacity_factor=1.0"])
    assert inference_config(ec) == (ec, [])
    dense = load_config(TINY_YAML, BASE + ["moe.num_experts=0", "moe.capacity_factor=1.25"])
    assert inference_config(dense) == (dense, [])


# ----------------------------------------------------------------------------- the tool


@pytest.fixture(scope="module")
def w1_ckpt(tmp_path_factory):
    """A world-1 checkpoint of a fresh tiny MoE (capacity-bound, so the tool makes it dropless)."""
    root = tmp_path_factory.mktemp("gen_w1")
    cfg = load_config(TINY_YAML, BASE + ["moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=1.25",
                                         "model.init_std=0.02"])
    write_sharded(growth.checkpoint_record(cfg, growth.fresh_state(cfg, seed=3), step=1), str(root / "ck"), "test")
    return root / "ck"


def test_tool_in_process_json(w1_ckpt, capsys):
    tool = _tool()
    assert tool.main(["--checkpoint", str(w1_ckpt), "--prompt", "def ", "--max-new-tokens", "6",
                      "--temperature", "0", "--json", "--no-stop-at-eod"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["prompt_ids"] == list(b"def ") and len(res["completion_ids"]) == 6 and res["cache"]
    assert res["text"].startswith("def ") and res["stop"] == "max_new_tokens"
    assert err.count("\n") == 1 and err.startswith("generate: note: moe.capacity_factor 1.25 -> null")
    # the same tokens without the cache; an empty prompt starts from the end-of-document token
    assert tool.main(["--checkpoint", str(w1_ckpt), "--prompt", "def ", "--max-new-tokens", "6",
                      "--temperature", "0", "--json", "--no-stop-at-eod", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr()[0])["completion_ids"] == res["completion_ids"]
    assert tool.main(["--checkpoint", str(w1_ckpt), "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr()[0])["prompt_ids"] == [0]
    # plain output: the text on stdout, a summary line on stderr
    assert tool.main(["--checkpoint", str(w1_ckpt), "--prompt", "def ", "--max-new-tokens", "6",
                      "--temperature", "0", "--no-stop-at-eod"]) == 0
    out, err = capsys.readouterr()
    assert out == res["text"] + "\n" and "6 tokens (max_new_tokens)" in err and "KV cache" in err


@pytest.mark.parametrize("args, expect", [
    (["--temperature", "-0.5"], "--temperature -0.5 must be >= 0"),
    (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    (["--top-p", "1.01"], "--top-p 1.01 must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k -1 must be >= 0"),
    (["--prompt", "x" * 46, "--max-new-tokens", "8"], "exceed model.max_seq_len=48"),
    (["--prompt", "x" * 60, "--max-new-tokens", "0"], "exceed model.max_seq_len=48"),
    (["--tokenizer-dir", "/nonexistent/tok"], "meta.json"),
    (["--threads", "-1"], "--threads -1 must be >= 0"),
], ids=["temperature", "top_p_0", "top_p_big", "top_k", "too_long", "prompt_too_long", "tokenizer", "threads"])
def test_tool_bad_input_is_one_line_exit_2(w1_ckpt, capsys, args, expect):
    assert _tool().main(["--checkpoint", str(w1_ckpt)] + args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("generate: error: ") and expect in err, err


def test_tool_prompt_outside_the_vocabulary(tmp_path, capsys):
    """A model with 128 ids and a byte prompt holding a byte >= 128 ('é' = c3 a9)."""
    cfg = load_config(TINY_YAML, BASE + ["model.vocab_size=128", "moe.num_experts=0"])
    write_sharded(growth.checkpoint_record(cfg, growth.fresh_state(cfg, seed=3), step=1), str(tmp_path / "ck"), "t")
    assert _tool().main(["--checkpoint", str(tmp_path / "ck"), "--prompt", "café"]) == 2
    err = capsys.readouterr()[1]
    assert err == "generate: error: prompt token id 195 is outside the model's vocabulary (model.vocab_size=128)\n"


def test_tool_missing_and_damaged_checkpoints(w1_ckpt, tmp_path, capsys):
    tool = _tool()
    assert tool.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr()[1]
    assert err.count("\n") == 1 and "no such file or directory" in err
    bad = tmp_path / "ck"
    shutil.copytree(w1_ckpt, bad)
    step = next(p for p in bad.iterdir() if p.name.startswith("step_"))
    data = max((p for p in step.rglob("*") if p.is_file() and p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert tool.main(["--checkpoint", str(step)]) == 1
    err = capsys.readouterr()[1]
    assert err.count("\n") == 1 and err.startswith("generate: error: "), err


# ----------------------------------------------------------------------------- end to end at ep=2


EP2 = BASE + ["model.init_std=0.02", "moe.num_experts=4", "moe.top_k=2", "moe.capacity_factor=1.25",
              "moe.shared_experts=1", "parallel.ep=2", "train.steps=3", "train.global_batch_size=4",
              "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1",
              "train.progress=false", "train.num_threads=1", "checkpoint.every=3", "logging.every=1",
              "logging.tensorboard=false"]


def _train_ep2(rank: int, world: int, root: str):
    cfg = load_config(TINY_YAML, EP2 + [f"logging.dir={root}/runs", f"checkpoint.dir={root}/ck"])
    dp, tp, ep = validate_layout(cfg, world)
    par = init_parallel(dp, tp, ep, LaunchEnv(rank, world, rank, world, "torchrun"), "cpu")
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    run_training(cfg, par, data, log=lambda m: None)


def test_ep2_checkpoint_generates_in_one_process(tmp_path):
    """Trained at ep=2 on 2 gloo ranks; tools/generate.py (a subprocess, world 1) loads it and
    writes the greedy continuation the consolidated world-1 model predicts."""
    run_dist(_train_ep2, 2, (str(tmp_path),))
    ck = tmp_path / "ck"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), "--checkpoint", str(ck),
                           "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0", "--json",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["step"] == 3 and res["cache"] and res["text"].startswith("def ")
    assert 1 <= len(res["completion_ids"]) <= 12 and math.isfinite(res["tokens_per_s"])
    from moetrain.checkpoint.convert import read_checkpoint
    _, full = read_checkpoint(str(ck))
    cfg, _ = inference_config(growth.config_from_dict(full["manifest"]["config"]))
    model = growth.build_model(cfg, full["model"])
    ids = list(b"def ")
    with torch.no_grad():
        for tok in res["completion_ids"]:
            assert tok == int(model(torch.tensor([ids]))[0][0, -1].argmax())
            ids.append(tok)
