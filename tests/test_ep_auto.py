"""parallel.ep=auto (config.resolve_layout): the largest expert-parallel size every rule accepts at
the world size of this start, capped by parallel.ep_max; one line when none fits."""
import pytest

from moetrain.config import ConfigError, load_config, resolve_layout, validate_layout


def _cfg(*extra):
    return load_config("configs/tiny_cpu.yaml", ["train.device=cpu", "parallel.ep=auto", *extra])


@pytest.mark.parametrize("extra,world,ep", [
    ((), 4, 4), ((), 2, 2), ((), 1, 1),
    (("moe.num_experts=6",), 4, 2),                                              # 6 experts: not 4
    (("moe.num_experts=6", "moe.placement=balanced", "moe.redundant_experts=2"), 4, 4),   # 6 + 2 fill 4
    (("parallel.ep_max=2",), 4, 2),
    (("parallel.tp=2",), 4, 2),                                                   # dp = 2
    (("moe.num_experts=0",), 4, 1),                                               # dense
])
def test_auto_picks_the_largest_ep_that_fits(extra, world, ep):
    cfg, note = resolve_layout(_cfg(*extra), world)
    assert cfg.parallel.ep == ep and validate_layout(_cfg(*extra), world)[2] == ep
    assert note.startswith(f"parallel.ep=auto: ep {ep} at world {world}")


def test_fixed_ep_is_left_alone():
    cfg = load_config("configs/tiny_cpu.yaml", ["train.device=cpu", "parallel.ep=2"])
    assert resolve_layout(cfg, 4) == (cfg, None)


def test_no_fit_and_bad_values_are_one_line():
    with pytest.raises(ConfigError) as info:
        resolve_layout(_cfg("train.global_batch_size=6"), 4)
    assert "finds no expert-parallel size for world 4" in str(info.value) and "\n" not in str(info.value)
    for bad, msg in (("parallel.ep=0", "an integer >= 1, or auto"), ("parallel.ep=banana", "an integer >= 1, or auto"),
                     ("parallel.ep=2.5", "an integer >= 1"), ("parallel.ep_max=0", "must be >= 1 or null")):
        with pytest.raises(ConfigError) as info:
            load_config("configs/tiny_cpu.yaml", ["train.device=cpu", bad])
        assert msg in str(info.value), str(info.value)


def test_cli_prints_the_choice(tmp_path):
    """World 1 under plain python: the run starts with the chosen ep on its first line."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "moetrain.train", "--config", "configs/tiny_cpu.yaml", "parallel.ep=auto",
                        "train.steps=1", "train.device=cpu", "train.eval_every=0", "model.n_layers=1", "model.dim=32",
                        "model.n_heads=2", "train.seq_len=32", "model.max_seq_len=32", "train.global_batch_size=2",
                        "logging.tensorboard=false", "train.progress=false", f"logging.dir={tmp_path}",
                        f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.every=0"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "moetrain: parallel.ep=auto: ep 1 at world 1 (dp 1, tp 1)" in r.stdout
