"""tools/export_hf.py: every recipe that maps to a transformers architecture loads with
AutoModelForCausalLM and gives our eval logits (fp32, CPU, max abs diff <= 1e-4, exported
dropless); the recipes that do not map exit 2 with one line; export -> import gives back the same
state dict."""
from __future__ import annotations

import json

import pytest
import torch
from _hf import REPO, TINY, TOL, hf_logits, load_ckpt, load_hf, our_logits, random_state, tokens, tool, write_ckpt

from moetrain.config import load_config
from moetrain.hf import mapping

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# recipe -> (config file, extra overrides, expected architecture)
EXPORTS = {
    "tiny_cpu": ("tiny_cpu", [], "MixtralForCausalLM"),
    "dense": ("dense", [], "LlamaForCausalLM"),
    "gshard": ("gshard", [], "MixtralForCausalLM"),
    "noisy_topk": ("noisy_topk", [], "MixtralForCausalLM"),
    "reroute": ("reroute", [], "MixtralForCausalLM"),
    "switch": ("switch", [], "Qwen2MoeForCausalLM"),
    "deepseek": ("deepseek", ["moe.expert_hidden=64"], "Qwen2MoeForCausalLM"),
    "shared_fine": ("shared_fine", [], "Qwen2MoeForCausalLM"),
    "aux_free": ("aux_free", [], "Glm4MoeForCausalLM"),
    "every2": ("tiny_cpu", ["moe.every=2"], "Qwen2MoeForCausalLM"),
    "top2_raw": ("tiny_cpu", ["moe.norm_topk_prob=false"], "Qwen2MoeForCausalLM"),
    "tied": ("tiny_cpu", ["model.tie_embeddings=true"], "MixtralForCausalLM"),
    "gqa": ("tiny_cpu", ["model.n_kv_heads=2"], "MixtralForCausalLM"),
    "first_dense": ("tiny_cpu", ["model.n_layers=3", "moe.first_dense_layers=1", "model.n_kv_heads=1"],
                    "Qwen2MoeForCausalLM"),
    "first_dense_every2": ("deepseek", ["model.n_layers=4", "moe.first_dense_layers=2", "moe.every=2",
                                        "moe.expert_hidden=64"], "Qwen2MoeForCausalLM"),
    "aux_free_first_dense": ("aux_free", ["model.n_layers=3", "moe.first_dense_layers=1", "model.n_kv_heads=2"],
                             "Glm4MoeForCausalLM"),
}
REFUSALS = {
    "peer": ("peer", ["moe.peer.num_keys=4", "moe.peer.heads=2", "moe.peer.top_k=2", "moe.peer.key_dim=8"], "PEER"),
    "moepp": ("moepp", [], "MoE++ zero-computation experts"),
    "expert_choice": ("expert_choice", [], "moe.router=expert_choice"),
}


def _cfg(recipe: str, extra=()):
    return load_config(str(REPO / "configs" / f"{recipe}.yaml"), [*TINY, *extra])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every EXPORTS recipe: a checkpoint of a random model and its export (sharded small)."""
    root = tmp_path_factory.mktemp("export")
    export = tool("export_hf")
    out = {}
    for name, (recipe, extra, _) in EXPORTS.items():
        cfg = _cfg(recipe, extra)
        write_ckpt(cfg, random_state(cfg), root / name / "ckpt")
        assert export.main(["--checkpoint", str(root / name / "ckpt"), "--out", str(root / name / "hf"),
                            "--max-shard-size", "60KB"]) == 0
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_logits_equal(exported, name):
    cfg, model, _ = load_ckpt(exported[name] / "ckpt", ["moe.capacity_factor=null"])
    hf = load_hf(exported[name] / "hf")
    assert type(hf).__name__ == EXPORTS[name][2]
    tok = tokens()
    diff = (our_logits(model, tok) - hf_logits(hf, tok)).abs().max().item()
    print(f"export {name} -> {EXPORTS[name][2]}: max abs logit diff {diff:.3g}")
    assert diff <= TOL


def test_export_shards_and_index(exported):
    hf_dir = exported["tiny_cpu"] / "hf"
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (hf_dir / "model.safetensors").exists()
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 8


def test_export_announces_dropless(tmp_path, capsys):
    cfg = _cfg("tiny_cpu")
    assert cfg.moe.capacity_factor == 1.25
    write_ckpt(cfg, random_state(cfg), tmp_path / "ckpt")
    assert tool("export_hf").main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "moe.capacity_factor=1.25 is not exported: the model is exported dropless" in out
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("name", list(REFUSALS))
def test_export_refusals(tmp_path, capsys, name):
    recipe, extra, reason = REFUSALS[name]
    cfg = _cfg(recipe, extra)
    write_ckpt(cfg, random_state(cfg), tmp_path / "ckpt")
    assert tool("export_hf").main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    print(f"refused {name}: {err[-1]}")
    assert len(err) == 1 and err[0].startswith("export_hf: error: ") and reason in err[0]
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name, keys", [
    ("gqa", {"num_key_value_heads": 2, "num_attention_heads": 4}),
    ("tiny_cpu", {"num_key_value_heads": 4}),
    ("first_dense", {"num_key_value_heads": 1, "mlp_only_layers": [0], "decoder_sparse_step": 1}),
    ("first_dense_every2", {"mlp_only_layers": [0, 1], "decoder_sparse_step": 2}),
    ("aux_free_first_dense", {"num_key_value_heads": 2, "first_k_dense_replace": 1}),
])
def test_export_writes_kv_heads_and_dense_first_layers(exported, name, keys):
    """num_key_value_heads = model.n_kv_heads (no repetition); dense first layers as Qwen2-MoE
    mlp_only_layers / Glm4Moe first_k_dense_replace."""
    cfg = json.loads((exported[name] / "hf" / "config.json").read_text())
    assert {k: cfg[k] for k in keys} == keys
    _, _, sd = load_ckpt(exported[name] / "ckpt")
    kv = keys.get("num_key_value_heads", 4)
    assert tuple(sd["layers.0.attn.wk.weight"].shape) == (kv * 8, 32)


def test_export_refuses_aux_free_with_alternating_layers():
    cfg = _cfg("aux_free", ["moe.every=2", "model.n_layers=4"])
    with pytest.raises(mapping.HFMapError, match="Glm4Moe, whose dense layers can only be the first k"):
        mapping.plan_export(cfg)


def test_rope_permutation_keeps_scores():
    """Our interleaved RoPE on (q, k) and HF's rotate_half on the row-permuted (q, k) give the
    same q.k (the algebra the export rests on)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from moetrain.model.transformer import apply_rope, rope_tables
    Dh, S = 8, 5
    cos, sin = rope_tables(S, Dh, 10000.0, "cpu")
    q, k = torch.randn(2, 1, 3, S, Dh).unbind(0)
    ours = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)
    perm = mapping.half_from_interleaved(Dh)
    emb_cos, emb_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    hq, hk = apply_rotary_pos_emb(q[..., perm], k[..., perm], emb_cos, emb_sin)
    assert torch.allclose(ours, hq @ hk.transpose(-1, -2), atol=1e-6)
    w = torch.randn(3 * Dh, 4)
    assert torch.equal(mapping.from_hf_rope(mapping.to_hf_rope(w, Dh), Dh), w)


@pytest.mark.parametrize("name", ["tiny_cpu", "dense", "switch", "deepseek", "shared_fine", "aux_free", "every2",
                                  "tied", "gqa", "first_dense", "first_dense_every2", "aux_free_first_dense"])
def test_export_import_round_trip(exported, tmp_path, name):
    """export -> import gives back every tensor bit for bit (shared experts: x2 then x0.5, exact)."""
    assert tool("import_hf").main(["--hf", str(exported[name] / "hf"), "--out", str(tmp_path / "back"),
                                   "--set", "train.device=cpu"]) == 0
    _, _, before = load_ckpt(exported[name] / "ckpt")
    _, _, after = load_ckpt(tmp_path / "back")
    dropped = {k for k in before if k.endswith("noise_weight")}
    assert set(after) == set(before) - dropped
    for k in after:
        assert torch.equal(after[k], before[k]), k


def test_export_copies_the_data_tokenizer(tmp_path, capsys):
    """Token data prepared with a Hugging Face tokenizer: tokenizer.json travels with the export,
    AutoTokenizer loads it and encodes as the file does, its end-of-document token is the eos."""
    tk = pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20,
                            tk.trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    eod = tok.token_to_id("<|endoftext|>")
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    data = tmp_path / "tokens"      # a token directory as tools/prepare_data.py writes it
    assert tool("prepare_data").main(["--out", str(data), "--tokenizer", str(tmp_path / "tokenizer.json"),
                                      "--val-frac", "0.3", str(tmp_path / "src")]) == 0
    cfg = _cfg("tiny_cpu", ["data.source=memmap", f"data.path={data}"])
    write_ckpt(cfg, random_state(cfg), tmp_path / "ckpt")
    assert tool("export_hf").main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "def g(y):\n    return y + 1\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == eod


@pytest.mark.slow
def test_export_after_training_at_ep2(tmp_path):
    """A shared-expert, every-other-layer recipe with a capacity factor, trained 2 steps on 2 ranks
    at ep=2: its checkpoint exports as Qwen2-MoE with our (dropless) eval logits."""
    from _dist import run_dist
    from _hf import train
    extra = [*TINY, "moe.shared_experts=1", "moe.every=2", "parallel.ep=2", "train.steps=2",
             "checkpoint.every=2", f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.dir={tmp_path / 'runs'}"]
    recs = run_dist(train, 2, (str(REPO / "configs" / "tiny_cpu.yaml"), extra))[0]
    assert sorted(r["step"] for r in recs if "loss" in r) == [1, 2]
    assert tool("export_hf").main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    cfg, model, _ = load_ckpt(tmp_path / "ckpt", ["moe.capacity_factor=null"])
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    tok = tokens(6)
    diff = (our_logits(model, tok) - hf_logits(hf, tok)).abs().max().item()
    print(f"export of a recipe trained at ep=2 (Qwen2-MoE): max abs logit diff {diff:.3g}")
    assert diff <= TOL
