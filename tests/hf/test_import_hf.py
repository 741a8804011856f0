"""tools/import_hf.py: tiny random transformers models built locally from a config (no download)
import with equal logits (fp32, CPU, max abs diff <= 1e-4), including grouped-query attention (kept
as model.n_kv_heads), dense first layers (moe.first_dense_layers) and tied embeddings; a dense Llama imports and upcycles exactly; an imported Mixtral trains at ep=2
(2 ranks) and resumes, and the trained checkpoint exports back with equal logits; what does not map
exits 2 with one line."""
from __future__ import annotations

import pytest
import torch
from _dist import run_dist
from _hf import TOL, TRAIN, hf_logits, load_ckpt, load_hf, our_logits, tokens, tool, train

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=64,
              initializer_range=0.1, rms_norm_eps=1e-5)


def _build(kind: str, **kw):
    """A tiny random transformers model of `kind`, norms away from 1 (a swapped tensor shows)."""
    t = transformers
    args = {**COMMON, **kw}
    if kind == "mixtral":
        model = t.MixtralForCausalLM(t.MixtralConfig(**{"intermediate_size": 48, "num_local_experts": 4,
                                                        "num_experts_per_tok": 2, **args}))
    elif kind == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**{"intermediate_size": 64, **args}))
    elif kind == "qwen2_moe":
        model = t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(**{
            "intermediate_size": 64, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
            "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False, "decoder_sparse_step": 1, **args}))
    elif kind == "glm4_moe":
        model = t.Glm4MoeForCausalLM(t.Glm4MoeConfig(**{
            "intermediate_size": 64, "moe_intermediate_size": 16, "n_shared_experts": 1, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "first_k_dense_replace": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}, **args}))
    else:
        raise ValueError(kind)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") or name.endswith("shared_expert_gate.weight"):
                p.zero_()
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model.eval()


IMPORTS = {
    # name: (kind, config kwargs, expected moetrain keys)
    "mixtral_gqa": ("mixtral", {"num_key_value_heads": 2, "rope_theta": 500.0},
                    {"moe.num_experts": 4, "moe.top_k": 2, "moe.router": "topk", "moe.norm_topk_prob": True,
                     "model.n_kv_heads": 2}),
    "llama_gqa": ("llama", {"num_key_value_heads": 1}, {"moe.num_experts": 0, "model.n_kv_heads": 1}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}, {"moe.num_experts": 0, "model.tie_embeddings": True,
                                                             "model.n_kv_heads": None}),
    "qwen2_moe_shared": ("qwen2_moe", {"num_key_value_heads": 2},
                         {"moe.num_experts": 4, "moe.shared_experts": 2, "moe.norm_topk_prob": False}),
    # 2 layers, first_k_dense_replace 1: layer 1 MoE is also moe.every=2 (the fewest first dense layers)
    "glm4_moe_first_dense": ("glm4_moe", {"num_key_value_heads": 2},
                             {"moe.router": "aux_free", "moe.every": 2, "moe.first_dense_layers": 0,
                              "moe.shared_experts": 1}),
    "glm4_moe_first_dense_3": ("glm4_moe", {"num_key_value_heads": 2, "num_hidden_layers": 3},
                               {"moe.router": "aux_free", "moe.every": 1, "moe.first_dense_layers": 1,
                                "model.n_kv_heads": 2}),
    "qwen2_moe_mlp_only": ("qwen2_moe", {"num_hidden_layers": 3, "mlp_only_layers": [0]},
                           {"moe.every": 1, "moe.first_dense_layers": 1, "model.n_kv_heads": None}),
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    imp = tool("import_hf")
    out = {}
    for name, (kind, kw, _) in IMPORTS.items():
        _build(kind, **kw).save_pretrained(str(root / name / "hf"))
        assert imp.main(["--hf", str(root / name / "hf"), "--out", str(root / name / "ckpt"),
                         "--set", "train.device=cpu", "--set", "train.seq_len=32"]) == 0
        out[name] = root / name
    return out


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("name", list(IMPORTS))
def test_import_logits_equal(imported, name):
    cfg, model, _ = load_ckpt(imported[name] / "ckpt")
    for key, value in IMPORTS[name][2].items():
        assert _get(cfg, key) == value, key
    assert cfg.moe.capacity_factor is None and cfg.train.device == "cpu"
    hf = load_hf(imported[name] / "hf")
    tok = tokens(1)
    diff = (our_logits(model, tok) - hf_logits(hf, tok)).abs().max().item()
    print(f"import {name}: max abs logit diff {diff:.3g}")
    assert diff <= TOL


def test_import_announces_gqa(tmp_path, capsys):
    _build("llama", num_key_value_heads=2).save_pretrained(str(tmp_path / "hf"))
    assert tool("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert out.count("grouped-query attention (2 K/V heads for 4 query heads): model.n_kv_heads=2") == 1
    cfg, model, sd = load_ckpt(tmp_path / "ckpt")
    assert cfg.model.n_kv_heads == 2 and tuple(sd["layers.0.attn.wk.weight"].shape) == (2 * 8, 32)   # not repeated


def test_imported_llama_upcycles_exactly(imported, tmp_path):
    """Dense Llama -> import -> tools/upcycle.py: the MoE model's logits equal the Llama's."""
    src = imported["llama_gqa"]
    assert tool("upcycle").main([str(src / "ckpt"), "--out", str(tmp_path / "moe"), "moe.num_experts=4",
                                 "moe.top_k=2", "moe.capacity_factor=null", "train.device=cpu"]) == 0
    cfg, model, _ = load_ckpt(tmp_path / "moe")
    assert cfg.moe.num_experts == 4
    tok = tokens(2)
    diff = (our_logits(model, tok) - hf_logits(load_hf(src / "hf"), tok)).abs().max().item()
    print(f"import llama -> upcycle: max abs logit diff {diff:.3g}")
    assert diff <= TOL


def _refuse_cases():
    """case -> (builds the HF model, what the one error line must say)"""
    t = transformers
    return {
        "nonzero bias": (lambda: _with_bias(), "nonzero bias"),
        "sliding window": (lambda: _build("mixtral", sliding_window=16), "sliding_window=16"),
        "rope scaling": (lambda: _build("llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 10000.0}), "rope type 'linear'"),
        "gated shared expert": (lambda: _with_shared_gate(), "shared_expert_gate is nonzero"),
        "top-1 renormalized": (lambda: _build("mixtral", num_experts_per_tok=1), "top-1 routing"),
        "partial rotary": (lambda: _build("glm4_moe", rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                           "partial_rotary_factor=0.5"),
        "gelu": (lambda: t.LlamaForCausalLM(t.LlamaConfig(intermediate_size=64, hidden_act="gelu", **COMMON)),
                 "hidden_act='gelu'"),
    }


def _with_bias():
    model = _build("llama", attention_bias=True)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.fill_(0.1)
    return model


def _with_shared_gate():
    model = _build("qwen2_moe")
    with torch.no_grad():
        model.model.layers[1].mlp.shared_expert_gate.weight.fill_(0.1)
    return model


@pytest.mark.parametrize("case", list(_refuse_cases()))
def test_import_refusals(tmp_path, capsys, case):
    build, reason = _refuse_cases()[case]
    build().save_pretrained(str(tmp_path / "hf"))
    capsys.readouterr()             # save_pretrained's progress bar
    assert tool("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    print(f"import refused ({case}): {err[-1]}")
    assert len(err) == 1 and err[0].startswith("import_hf: error: ") and reason in err[0], err
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_import_refuses_set_of_mapped_keys(imported, tmp_path, capsys):
    src = imported["mixtral_gqa"] / "hf"
    assert tool("import_hf").main(["--hf", str(src), "--out", str(tmp_path / "a"), "--set", "model.dim=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.dim comes from the HF model's config" in err[0], err
    assert tool("import_hf").main(["--hf", str(src), "--out", str(tmp_path / "b"), "--set", "moe.capacity_factor=1.5",
                                   "--set", "train.lr=1e-4"]) == 0
    assert "moe.capacity_factor=1.5 (--set): copies over capacity are dropped" in capsys.readouterr().out
    cfg, _, _ = load_ckpt(tmp_path / "b")
    assert cfg.moe.capacity_factor == 1.5 and cfg.train.lr == 1e-4


def test_import_refuses_unreadable_dir(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    assert tool("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid JSON" in err[0]
    _build("llama").save_pretrained(str(tmp_path / "hf2"))
    st = tmp_path / "hf2" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    capsys.readouterr()
    assert tool("import_hf").main(["--hf", str(tmp_path / "hf2"), "--out", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable safetensors file" in err[0], err


def test_import_bf16_weights_become_fp32(tmp_path, capsys):
    """Hub models are mostly bf16: the checkpoint holds fp32 master weights (exact widening)."""
    hf = _build("mixtral").to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "hf"))
    assert tool("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert "weights converted from bfloat16 to float32" in capsys.readouterr().out
    _, model, sd = load_ckpt(tmp_path / "ckpt")
    assert {v.dtype for v in sd.values()} == {torch.float32}
    tok = tokens(5)
    assert (our_logits(model, tok) - hf_logits(load_hf(tmp_path / "hf"), tok)).abs().max().item() <= TOL


def test_import_fused_expert_layout(tmp_path):
    """transformers 5's in-memory names (experts.gate_up_proj / down_proj, mlp.gate) import too."""
    from safetensors.torch import save_file
    hf = _build("mixtral")
    hf.config.save_pretrained(str(tmp_path / "hf"))
    sd = {k: v.contiguous().clone() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert tool("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    _, model, _ = load_ckpt(tmp_path / "ckpt")
    tok = tokens(4)
    assert (our_logits(model, tok) - hf_logits(hf, tok)).abs().max().item() <= TOL


@pytest.mark.slow
def test_imported_mixtral_trains_at_ep2_resumes_and_exports(imported, tmp_path):
    """Imported Mixtral, 2 ranks, ep=2: step-0 val loss equals the imported model's (world 1), it
    trains 2 steps and checkpoints, a second run resumes at step 3; the trained checkpoint exports
    with logits equal to ours."""
    ckpt = imported["mixtral_gqa"] / "ckpt"
    cfg_path = str(ckpt / "imported.yaml")
    work = tmp_path / "run"
    common = ["parallel.ep=2", f"checkpoint.dir={work}", f"checkpoint.resume={ckpt}", "checkpoint.every=2",
              "train.eval_every=2", "train.seq_len=32", "train.device=cpu"]
    recs = run_dist(train, 2, (cfg_path, [*common, "train.steps=2", f"logging.dir={tmp_path / 'runs1'}"]))[0]
    losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    init_val = next(r["init_val_loss"] for r in recs if r.get("step") == 1 and "init_val_loss" in r)
    assert init_val == pytest.approx(_world1_val_loss(cfg_path), rel=1e-5)
    recs2 = run_dist(train, 2, (cfg_path, [*common, "checkpoint.resume=auto", "train.steps=4",
                                           f"logging.dir={tmp_path / 'runs2'}"]))[0]
    assert sorted(r["step"] for r in recs2 if "loss" in r) == [3, 4]
    assert tool("export_hf").main(["--checkpoint", str(work), "--out", str(tmp_path / "hf")]) == 0
    _, model, _ = load_ckpt(work)
    tok = tokens(3)
    diff = (our_logits(model, tok) - hf_logits(load_hf(tmp_path / "hf"), tok)).abs().max().item()
    print(f"export of the ep=2-trained import: max abs logit diff {diff:.3g}")
    assert diff <= TOL


def _world1_val_loss(cfg_path: str) -> float:
    from moetrain import growth
    from moetrain.config import load_config
    from moetrain.data import eval_batches, load_token_data
    cfg = load_config(cfg_path, [*TRAIN, "train.seq_len=32"])
    _, model, _ = load_ckpt(cfg.checkpoint.dir)
    data = load_token_data(cfg.data.source, cfg.data.path, cfg.model.vocab_size)
    batches = eval_batches(data.val, cfg.train.eval_batches, cfg.train.global_batch_size, cfg.train.seq_len)
    (loss,), _ = growth.ensemble_losses([model], batches, cfg.train.micro_batch_size)
    return loss


def _edit_config(hf_dir, drop=(), **set_):
    import json
    path = hf_dir / "config.json"
    conf = json.loads(path.read_text())
    for key in drop:
        conf.pop(key, None)
    conf.update(set_)
    path.write_text(json.dumps(conf))


def _refused(tmp_path, capsys, code: int, reason: str, src=None):
    assert tool("import_hf").main(["--hf", str(src or tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("import_hf: error: ") and reason in err[0], err
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_import_glm4_config_omitting_keys_means_transformers_defaults(tmp_path):
    """Glm4MoeConfig's defaults: n_shared_experts 1, first_k_dense_replace 1, rms_norm_eps 1e-5."""
    hf = _build("glm4_moe", num_key_value_heads=2, num_hidden_layers=3)
    hf.save_pretrained(str(tmp_path / "hf"))
    _edit_config(tmp_path / "hf", drop=("n_shared_experts", "first_k_dense_replace", "rms_norm_eps"))
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "hf")).n_shared_experts == 1
    assert tool("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    cfg, model, _ = load_ckpt(tmp_path / "ckpt")
    assert cfg.moe.shared_experts == 1 and cfg.moe.first_dense_layers == 1 and cfg.model.norm_eps == 1e-5
    tok = tokens(6)
    assert (our_logits(model, tok) - hf_logits(load_hf(tmp_path / "hf"), tok)).abs().max().item() <= TOL


def test_import_mixtral_default_eps(tmp_path):
    _build("mixtral").save_pretrained(str(tmp_path / "hf"))
    _edit_config(tmp_path / "hf", drop=("rms_norm_eps",))
    assert tool("import_hf").main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    cfg, _, _ = load_ckpt(tmp_path / "ckpt")
    assert cfg.model.norm_eps == 1e-5


def test_import_refuses_dropped_shared_expert(tmp_path, capsys):
    """n_shared_experts 0 in the config, real shared-expert weights in the files: not silently dropped."""
    _build("glm4_moe").save_pretrained(str(tmp_path / "hf"))
    _edit_config(tmp_path / "hf", n_shared_experts=0)
    capsys.readouterr()
    _refused(tmp_path, capsys, 2, "shared_experts.down_proj.weight is nonzero but the config has no shared expert")


MALFORMED = {
    "no hidden_size": (dict(drop=("hidden_size",)), "config.json has no hidden_size"),
    "string heads": (dict(num_attention_heads="4"), "num_attention_heads='4'"),
    "zero heads": (dict(num_attention_heads=0), "num_attention_heads=0"),
    "no experts_per_tok": (dict(drop=("num_experts_per_tok",)), "config.json has no num_experts_per_tok"),
    "bool experts": (dict(num_local_experts=True), "num_local_experts=True"),
    "huge layers": (dict(num_hidden_layers=10 ** 9), "num_hidden_layers=1000000000 but the weights hold 2 layers"),
    "list model_type": (dict(model_type=["mixtral"]), "model_type ['mixtral']"),
    "huge hidden_size": (dict(hidden_size=2 ** 40, head_dim=2 ** 38), "not [vocab_size=256, hidden_size=1099511627776]"),
    "string eps": (dict(rms_norm_eps="x"), "rms_norm_eps='x'"),
    "rope_parameters list": (dict(rope_parameters=[1]), "rope_parameters=[1]"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_import_refuses_malformed_config(tmp_path, capsys, case):
    edit, reason = MALFORMED[case]
    _build("mixtral").save_pretrained(str(tmp_path / "hf"))
    edit = dict(edit)
    _edit_config(tmp_path / "hf", drop=edit.pop("drop", ()), **edit)
    capsys.readouterr()
    _refused(tmp_path, capsys, 2, reason)


def test_import_refuses_malformed_json_and_index(tmp_path, capsys):
    import json
    from moetrain.hf import files
    hf = tmp_path / "hf"
    _build("llama").save_pretrained(str(hf))
    good = (hf / "config.json").read_text()
    capsys.readouterr()
    (hf / "config.json").write_text("[" * 100000 + "]" * 100000)
    _refused(tmp_path, capsys, 1, "nested too deeply")
    (hf / "config.json").write_text('{"vocab_size": ' + "9" * 5000 + "}")
    _refused(tmp_path, capsys, 1, "not valid JSON")
    (hf / "config.json").write_text(good)
    (hf / files.INDEX).write_text(json.dumps({"weight_map": {"model.norm.weight": 5}}))
    _refused(tmp_path, capsys, 1, "weight_map names shard '5'")
    (hf / files.INDEX).write_text(json.dumps({"weight_map": {"model.norm.weight": ["a"]}}))
    _refused(tmp_path, capsys, 1, "weight_map names shard")
    with pytest.raises(files.HFReadError, match="cannot read"):
        files._read_json(str(tmp_path))      # a directory: IsADirectoryError
