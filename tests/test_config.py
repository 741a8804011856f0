"""Config loading (YAML + dotted overrides), validation and layout resolution (moetrain.config)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.config import (Config, ConfigError, check_output_dirs, load_config, micro_batch, replace_keys, validate,
                             validate_layout)

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    assert msg.strip(), "empty message"
    return msg


def test_load_tiny_config():
    cfg = load_config(TINY)
    assert isinstance(cfg, Config)
    assert (cfg.model.vocab_size, cfg.model.dim, cfg.model.n_layers) == (256, 128, 4)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.capacity_factor) == (8, 2, 1.25)
    assert cfg.data.source == "stdlib" and cfg.data.path is None
    assert cfg.train.lr == pytest.approx(3e-3)
    assert cfg.parallel.dp is None and cfg.parallel.ep == 1


def test_no_file_gives_schema_defaults():
    assert load_config(None) == Config()


def test_overrides_apply():
    cfg = load_config(TINY, ["moe.num_experts=16", "moe.capacity_factor=null", "train.lr=1e-3",
                             "parallel.ep=2", "logging.tensorboard=false", "data.path=/x/y"])
    assert cfg.moe.num_experts == 16
    assert cfg.moe.capacity_factor is None
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.parallel.ep == 2
    assert cfg.logging.tensorboard is False
    assert cfg.data.path == "/x/y"
    # later overrides win; untouched keys keep the YAML value
    cfg = load_config(TINY, ["train.steps=5", "train.steps=7"])
    assert cfg.train.steps == 7 and cfg.train.seq_len == 256


def test_yaml_values_override_schema_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("moe:\n  top_k: 1\n  capacity_factor: null\ntrain:\n  steps: 3\n")
    cfg = load_config(str(p))
    assert cfg.moe.top_k == 1 and cfg.moe.capacity_factor is None and cfg.train.steps == 3
    assert cfg.model == Config().model                       # groups not in the file: defaults


def test_empty_yaml_is_the_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(str(p)) == Config()


@pytest.mark.parametrize("overrides, key", [
    (["moe.foo=1"], "moe.foo"),
    (["foo=1"], "foo"),
    (["train.steps=abc"], "train.steps"),
    (["model.dim=abc"], "model.dim"),
    (["logging.tensorboard=maybe"], "logging.tensorboard"),
    (["moe.top_k=99"], "moe.top_k"),
    (["moe.top_k=0"], "moe.top_k"),
    (["moe.capacity_factor=0"], "moe.capacity_factor"),
    (["moe.capacity_factor=-1.5"], "moe.capacity_factor"),
    (["train.seq_len=512"], "train.seq_len"),
    (["parallel.ep=3"], "parallel.ep"),
    (["moe.num_experts=0", "parallel.ep=2"], "parallel.ep"),
    (["parallel.dp=2", "parallel.ep=4"], "parallel.ep"),
    (["moe.router=nope"], "moe.router"),
    (["moe.router=switch"], "moe.top_k"),                 # switch is top-1, tiny has top_k=2
    (["moe.grouped_mm=fast"], "moe.grouped_mm"),
    (["data.source=s3"], "data.source"),
    (["moe.top_k"], "moe.top_k"),                         # no '='
    (["moe.router=expert_choice", "moe.capacity_factor=null"], "moe.capacity_factor"),  # never dropless
    (["train.seed=-1"], "train.seed"),
    (["moe.capacity_factor=inf"], "moe.capacity_factor"),   # passes `> 0`, then breaks capacity math
    (["train.lr=inf"], "train.lr"),
    (["train.lr=nan"], "train.lr"),
    (["model.rope_theta=0"], "model.rope_theta"),
    (["model.norm_eps=-1"], "model.norm_eps"),
    (["checkpoint.dir=''"], "checkpoint.dir"),
    (["logging.dir=' '"], "logging.dir"),
])
def test_bad_override_names_the_key_in_one_line(overrides, key):
    msg = config_error(TINY, overrides)
    assert key in msg


def test_override_values_are_in_the_message():
    assert "99" in config_error(TINY, ["moe.top_k=99"])
    assert "512" in config_error(TINY, ["train.seq_len=512"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("moe:\n  num_experts: 4\n  foo: 1\n")
    assert "foo" in config_error(str(p))
    p.write_text("bogus:\n  x: 1\n")
    assert "bogus" in config_error(str(p))


def test_wrong_type_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: abc\n")
    assert "train.steps" in config_error(str(p))


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert missing in config_error(missing)


@pytest.mark.parametrize("text", ["moe: {top_k: 2\n", "moe:\n  top_k: [1\n", "a: b: c\n"])
def test_invalid_yaml(tmp_path, text):
    p = tmp_path / "broken.yaml"
    p.write_text(text)
    msg = config_error(str(p))
    assert str(p) in msg and "YAML" in msg


def test_yaml_list_at_top_level(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    assert str(p) in config_error(str(p))


@pytest.mark.parametrize("group", ["moe", "moe.zero_experts"])
@pytest.mark.parametrize("source", ["override", "yaml"])
def test_scalar_for_a_group_names_the_group(tmp_path, source, group):
    if source == "yaml":
        p = tmp_path / "g.yaml"
        p.write_text("moe: 3\n" if group == "moe" else "moe:\n  zero_experts: 3\n")
        msg = config_error(str(p))
    else:
        msg = config_error(TINY, [f"{group}=3"])
    assert f"{group}" in msg and "3" in msg and "Merge error" not in msg


@pytest.mark.parametrize("key", ["checkpoint.resume", "logging.run_name"])
def test_empty_override_for_a_required_string_says_null_is_not_allowed(key):
    msg = config_error(TINY, [f"{key}="])
    assert f"{key}=null is not allowed" in msg and "str" in msg
    assert load_config(TINY, ["moe.capacity_factor="]).moe.capacity_factor is None   # optional: null ok


def test_validate_accepts_the_defaults_and_dense():
    validate(Config())
    validate(load_config(None, ["moe.num_experts=0"]))


def test_configs_are_frozen_and_replace_keys_builds_a_new_one():
    import dataclasses
    cfg = load_config(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.moe.top_k = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = None
    new = replace_keys(cfg, {"moe.top_k": 1, "moe.peer.heads": 2, "logging.run_name": "x"})
    assert (new.moe.top_k, new.moe.peer.heads, new.logging.run_name) == (1, 2, "x")
    assert (cfg.moe.top_k, cfg.moe.peer.heads, cfg.logging.run_name) == (2, 4, "tiny")   # untouched
    assert new.model is cfg.model                                                      # shared, not copied


def test_router_names_and_checks_come_from_the_registry():
    from moetrain.moe.router import ROUTERS
    msg = config_error(TINY, ["moe.router=nope"])
    assert ", ".join(ROUTERS) in msg
    for name, spec in ROUTERS.items():
        k = spec.top_k or 2
        extra = ["moe.aux_loss_scope=micro_batch"] + ([] if spec.dropless else ["moe.capacity_factor=1.0"])
        load_config(TINY, [f"moe.router={name}", f"moe.top_k={k}"] + extra)          # its own needs met: valid
        if spec.own_balance_loss:
            assert "moe.aux_loss_scope" in config_error(TINY, [f"moe.router={name}", f"moe.top_k={k}",
                                                                "moe.aux_loss_scope=sequence"] + extra[1:])
        if not spec.dropless:
            assert "moe.capacity_factor" in config_error(TINY, [f"moe.router={name}", f"moe.top_k={k}",
                                                               "moe.capacity_factor=null"])
        if not spec.token_choice:
            assert "moe.zero_experts" in config_error(TINY, [f"moe.router={name}", "moe.zero_experts.zero=1"])
            assert "moe.overflow" in config_error(TINY, [f"moe.router={name}", "moe.overflow=reroute"])


@pytest.mark.parametrize("overrides", [
    ["moe.router=switch", "moe.top_k=1"],                    # raw top-1 probability: nothing to renormalize
    ["moe.norm_topk_prob=false"],                            # topk with raw gates
    ["moe.top_k=1"],                                         # a single copy
    ["moe.router=expert_choice", "moe.top_k=1"],             # expert choice has no top-k of a token
    ["moe.capacity_factor=null"],                            # dropless: nothing is dropped
])
def test_renormalize_after_drop_only_where_it_applies(overrides):
    assert "moe.renormalize_after_drop" in config_error(TINY, ["moe.renormalize_after_drop=true"] + overrides)


@pytest.mark.parametrize("router", ["topk", "gshard", "noisy_topk", "aux_free"])
def test_renormalize_after_drop_for_normalized_top_k(router):
    cfg = load_config(TINY, ["moe.renormalize_after_drop=true", f"moe.router={router}"])
    assert cfg.moe.renormalize_after_drop and not load_config(TINY).moe.renormalize_after_drop   # default off


@pytest.mark.parametrize("overrides, needle", [
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 is not allowed: must divide model.n_heads=4"),
    (["model.n_kv_heads=0"], "model.n_kv_heads=0 is not allowed: must divide model.n_heads=4"),
    (["model.n_kv_heads=8"], "model.n_kv_heads=8 is not allowed: must divide model.n_heads=4"),
    (["model.n_kv_heads=1", "parallel.tp=2"], "parallel.tp=2 is not allowed: must divide model.n_kv_heads=1"),
    (["moe.first_dense_layers=-1"], "moe.first_dense_layers=-1 is not allowed: must be >= 0"),
    (["moe.first_dense_layers=4"], "moe.first_dense_layers=4 is not allowed: leaves no MoE layer"),
    (["model.n_layers=5", "moe.first_dense_layers=4", "moe.every=2"],          # layer 4 is not an every-2nd one
     "moe.first_dense_layers=4 is not allowed: leaves no MoE layer"),
])
def test_gqa_and_first_dense_layers_bad_values_are_one_line(overrides, needle):
    assert needle in config_error(TINY, ["train.device=cpu"] + overrides)


def test_gqa_and_first_dense_layers_defaults_and_rule():
    from moetrain.config import has_dense_layers, is_moe_layer
    cfg = load_config(TINY, ["train.device=cpu"])
    assert cfg.model.n_kv_heads is None and cfg.model.kv_heads == cfg.model.n_heads == 4
    assert cfg.moe.first_dense_layers == 0 and not has_dense_layers(cfg)
    cfg = load_config(TINY, ["train.device=cpu", "model.n_kv_heads=2", "moe.first_dense_layers=1", "moe.every=2",
                             "model.n_layers=6", "parallel.tp=2"])
    assert cfg.model.kv_heads == 2 and cfg.model.head_dim == 32
    # layer i is MoE iff i >= first_dense_layers and (i + 1) % every == 0
    assert [is_moe_layer(cfg, i) for i in range(6)] == [False, True, False, True, False, True]
    cfg = load_config(TINY, ["train.device=cpu", "moe.first_dense_layers=2"])
    assert [is_moe_layer(cfg, i) for i in range(4)] == [False, False, True, True] and has_dense_layers(cfg)
    # tp must divide model.ffn_hidden once a first dense layer exists
    assert "model.ffn_hidden=63" in config_error(TINY, ["train.device=cpu", "moe.first_dense_layers=1",
                                                        "model.ffn_hidden=63", "moe.expert_hidden=16",
                                                        "parallel.tp=2"])
    dense = load_config(TINY, ["train.device=cpu", "moe.num_experts=0", "moe.first_dense_layers=9"])
    assert not any(is_moe_layer(dense, i) for i in range(4))      # a dense model ignores the moe keys


# --------------------------------------------------------------------------- validate_layout

def layout_error(cfg, world) -> str:
    with pytest.raises(ConfigError) as info:
        validate_layout(cfg, world)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_validate_layout_resolves_dp():
    cfg = load_config(TINY, ["train.global_batch_size=16", "train.micro_batch_size=8"])
    assert validate_layout(cfg, 1) == (1, 1, 1)
    assert validate_layout(cfg, 2) == (2, 1, 1)
    cfg = load_config(TINY, ["parallel.ep=2", "train.micro_batch_size=2"])
    assert validate_layout(cfg, 4) == (4, 1, 2)
    cfg = load_config(TINY, ["parallel.dp=2", "parallel.ep=2"])
    assert validate_layout(cfg, 2) == (2, 1, 2)


def test_validate_layout_world_not_divisible():
    cfg = replace_keys(Config(), {"parallel.tp": 2})     # frozen: a new config; layout is checked alone
    assert "parallel.tp" in layout_error(cfg, 3)
    cfg = load_config(TINY, ["parallel.dp=2"])
    msg = layout_error(cfg, 3)               # dp * tp != world
    assert "parallel.dp" in msg and "3" in msg


def test_validate_layout_dp_not_multiple_of_ep():
    cfg = load_config(TINY, ["parallel.ep=2", "train.micro_batch_size=1", "train.global_batch_size=3"])
    assert "parallel.ep" in layout_error(cfg, 3)


def test_validate_layout_batch_divisibility_and_micro_batch_cap():
    cfg = load_config(TINY, ["train.global_batch_size=16", "train.micro_batch_size=8"])
    for world, micro in ((1, 8), (2, 8), (4, 4), (8, 2), (16, 1)):   # micro capped at 16 / dp
        assert validate_layout(cfg, world) == (world, 1, 1)
        assert micro_batch(cfg, world) == micro
    msg = layout_error(cfg, 3)               # 16 sequences do not split over 3 ranks
    assert "train.global_batch_size" in msg and "parallel.dp=3" in msg
    cfg = load_config(TINY, ["train.global_batch_size=12", "train.micro_batch_size=4"])
    msg = layout_error(cfg, 2)               # 6 per rank, micro 4 does not divide it
    assert "train.micro_batch_size" in msg and "= 6" in msg
    assert validate_layout(cfg, 3) == (3, 1, 1)                 # 4 per rank
    assert validate_layout(cfg, 4) == (4, 1, 1) and micro_batch(cfg, 4) == 3


# --------------------------------------------------------------------------- CLI

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCALRANKID", "MV2_", "TORCHELASTIC_")


def test_cli_bad_config_exits_2_with_one_line():
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "moetrain.train", "--config", "configs/tiny_cpu.yaml",
                           "train.device=cpu", "moe.top_k=99"], cwd=str(REPO), env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moetrain: error:")
    assert "moe.top_k" in lines[0]


@pytest.mark.slow
def test_cli_non_finite_gradient_stops_every_rank_with_one_line(tmp_path):
    """A diverged run (here: absurd init) stops before the optimizer step on every rank, exit 3."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}
    env["PYTHONPATH"] = str(REPO)
    tiny = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_hidden=64", "train.seq_len=32",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=3", "train.eval_every=0",
            "train.progress=false", "logging.tensorboard=false", f"logging.dir={tmp_path}", "model.init_std=1e30",
            "parallel.ep=2", "train.device=cpu"]       # 2 gloo CPU ranks, not NCCL on one GPU
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "moetrain.train", "--config", "configs/tiny_cpu.yaml", *tiny],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("moetrain: error:")]
    assert len(errors) == 2, proc.stderr[-3000:]                    # one line from each rank
    assert all("step 1: the gradient norm is nan" in ln for ln in errors)
    assert "exitcode: 3" in proc.stderr, proc.stderr[-3000:]                # torchrun reports the rank exits


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: Path(p).stem)
def test_every_shipped_config_loads_and_fits_worlds_1_to_8(path):
    """Including README's `torchrun --nproc_per_node 4 ... parallel.ep=4` (micro batch capped)."""
    cfg = load_config(path, [])
    assert validate_layout(cfg, 1) == (1, 1, 1)
    for world in (2, 4, 8):
        ep = world if cfg.moe.num_experts % world == 0 and cfg.moe.num_experts else 1
        assert validate_layout(load_config(path, [f"parallel.ep={ep}"]), world) == (world, 1, ep)


def test_dense_and_shared_fine_have_the_same_active_ffn_width():
    """The MoE-vs-dense comparison in README is at equal active parameters per token."""
    root = Path(__file__).resolve().parents[1] / "configs"
    dense = load_config(str(root / "dense.yaml"), [])
    moe = load_config(str(root / "shared_fine.yaml"), [])
    assert dense.moe.num_experts == 0
    active = moe.routed_top_k * moe.expert_hidden + moe.moe.shared_experts * moe.base_expert_hidden
    assert active == dense.model.ffn_hidden == 384
    assert moe.num_ffn_experts == 16 and moe.moe.capacity_factor is None


def test_output_dirs_that_cannot_be_written_are_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cfg = load_config(TINY, [f"logging.dir={afile}"])
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_output_dirs(cfg)
    cfg = load_config(TINY, [f"logging.dir={tmp_path / 'new' / 'deeper'}", "checkpoint.every=2",
                             f"checkpoint.dir={afile / 'ck'}"])
    with pytest.raises(ConfigError, match="checkpoint.dir=.* is a file"):
        check_output_dirs(cfg)
    check_output_dirs(load_config(TINY, [f"logging.dir={tmp_path / 'new' / 'deeper'}"]))
    assert sorted(os.listdir(tmp_path)) == ["afile"]          # the probe leaves nothing behind


@pytest.mark.parametrize("name", ["..", ".", "a/b"])
def test_run_name_that_would_leave_its_directory_is_refused(name):
    msg = config_error(TINY, [f"logging.run_name={name}"])
    assert "logging.run_name" in msg and "not '.' or '..'" in msg
