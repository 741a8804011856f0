"""tools/bench_placement.py at toy sizes: the four cases run, the balanced ones re-place (weights and
moments move) and even out the rows per rank; bad arguments are one line and exit 2."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_toy_run(tmp_path):
    out = tmp_path / "b.jsonl"
    r = subprocess.run([sys.executable, "tools/bench_placement.py", "--world", "2", "--experts", "8", "--redundant", "2",
                        "--tokens", "256", "--dim", "16", "--hidden", "32", "--warmup", "0", "--iters", "2",
                        "--settle", "1", "--skew", "hot:0.6", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {x["case"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert list(recs) == ["uniform", "static", "balanced R=0", "balanced R=2"]
    assert recs["static"]["imbalance"] > 1.3                        # expert 0 is in most tokens' top-2
    assert recs["balanced R=2"]["imbalance"] < recs["static"]["imbalance"]
    assert recs["balanced R=2"]["move_mb"] > 0 and sum(recs["balanced R=2"]["replicas"]) == 10
    # dropless: k copies of every token (recv is each rank's median over steps: about the total)
    assert all(abs(sum(x["recv"]) - 2 * 256 * 2) < 0.15 * 2 * 256 * 2 for x in recs.values())


def test_bad_arguments_are_one_line():
    for argv, msg in ((["--world", "3"], "must divide by --world"), (["--skew", "hot:2"], "--skew must be"),
                      (["--world", "1"], "--world must be >= 2")):
        r = subprocess.run([sys.executable, "tools/bench_placement.py", *argv], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr.strip().splitlines()[-1], r.stderr
