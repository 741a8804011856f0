"""Offline install: tools/make_wheelhouse.sh and tools/setup_env.sh with MOETRAIN_WHEELHOUSE.

Without network: the requirement list matches setup.py and setup_env.sh; setup_env.sh's exact pip
command lines online (unchanged) and offline (--no-index --find-links DIR, no torch) through a
recording stand-in for python; the one-line refusals of both scripts.
With PyPI (skipped otherwise): a small wheelhouse for this Python (built deepspeed and antlr4
wheels, no torch) and one for another Python version, then setup_env.sh installs from it into a
plain venv without asking any package index. The full set: by hand (--python 3.12, no --only)."""
from __future__ import annotations

import ast
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
pytestmark = pytest.mark.slow     # python -m pytest -m 'not slow': the quick inner loop

REPO = Path(__file__).resolve().parents[2]
MAKE = REPO / "tools" / "make_wheelhouse.sh"
SETUP_ENV = REPO / "tools" / "setup_env.sh"
PYVER = "%d.%d" % sys.version_info[:2]
OTHER_PYVER = "3.11" if PYVER == "3.12" else "3.12"
TORCHLIKE = re.compile(r"^(torch|triton|nvidia_\w+_cu\d+)-", re.I)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOETRAIN_") and k != "PYTHON"}
    env.update(extra)
    return env


def _run(cmd, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _one_line(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode != 0, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


@functools.lru_cache(maxsize=1)
def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request("https://pypi.org/simple/pip/", method="HEAD"), timeout=3)
        return True
    except OSError:
        return False


@pytest.fixture
def pypi():
    if not _pypi_reachable():
        pytest.skip("PyPI (https://pypi.org) did not answer within 3 s: make_wheelhouse.sh downloads from it")


# ---------------------------------------------------------------- without network


def test_requirements_match_setup_py_and_setup_env():
    """Every non-torch requirement of setup.py (install_requires and all extras) is in REQS, and
    every spec setup_env.sh installs is in REQS verbatim (same pins)."""
    call = next(n for n in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    wanted = list(kw["install_requires"]) + [r for reqs in kw["extras_require"].values() for r in reqs]
    name = lambda spec: re.match(r"[A-Za-z0-9._-]+", spec).group().lower()  # noqa: E731
    reqs = shlex.split(re.search(r"^REQS=\((.*?)\)", MAKE.read_text(), re.S | re.M).group(1))
    assert {name(r) for r in wanted} - {"torch"} <= {name(r) for r in reqs}
    pinned = re.findall(r'"([^"]+)"', " ".join(re.findall(r"^\s*pip_install (.*)$", SETUP_ENV.read_text(), re.M)))
    assert set(pinned) - {".[dev,hf]"} <= set(reqs), pinned


@pytest.fixture
def fake_python(tmp_path):
    """A stand-in for $PYTHON that records its `-m pip ...` calls; `import torch` succeeds when
    FAKE_TORCH=1; other `-c` code runs in the real interpreter."""
    log = tmp_path / "pip-calls.txt"
    py = tmp_path / "fakepy"
    py.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then
  case $2 in *"import torch"*) [ "${{FAKE_TORCH:-}}" = 1 ]; exit ;; esac
  exec {sys.executable} "$@"
fi
printf '%s\\n' "$*" >>{log}
""")
    py.chmod(0o755)
    return py, log


def test_setup_env_pip_command_lines(fake_python, tmp_path):
    py, log = fake_python
    # Online (no MOETRAIN_WHEELHOUSE): the same four installs, argument for argument, as before.
    p = _run(["bash", str(SETUP_ENV)], env=_env(PYTHON=str(py)))
    assert p.returncode == 0, p.stderr
    assert log.read_text().splitlines() == [
        "-m pip install -q -r requirements/cpu.txt",
        "-m pip install -q -e .[dev,hf]",
        "-m pip install -q mpi4py>=4 mpich>=4",
        "-m pip install -q deepspeed==0.19.8",
    ]
    # Offline: every install reads only the wheelhouse, and torch is never installed. A relative
    # directory is the caller's, although setup_env.sh changes to the repository root.
    log.unlink()
    (tmp_path / "wh").mkdir()
    p = _run(["bash", str(SETUP_ENV)], cwd=tmp_path,
             env=_env(PYTHON=str(py), FAKE_TORCH="1", MOETRAIN_WHEELHOUSE="wh"))
    assert p.returncode == 0, p.stderr
    off = f"-m pip install -q --no-index --find-links {tmp_path / 'wh'}"
    assert log.read_text().splitlines() == [
        f"{off} -e .[dev,hf]", f"{off} mpi4py>=4 mpich>=4", f"{off} deepspeed==0.19.8"]


def test_setup_env_offline_refusals(fake_python, tmp_path):
    py, log = fake_python
    (tmp_path / "wh").mkdir()
    wh = str(tmp_path / "wh")
    _one_line(_run(["bash", str(SETUP_ENV)], env=_env(PYTHON=str(py), FAKE_TORCH="1",
                                                      MOETRAIN_WHEELHOUSE=str(tmp_path / "nope"))),
              "is not a directory")
    _one_line(_run(["bash", str(SETUP_ENV)], env=_env(PYTHON=str(py), MOETRAIN_WHEELHOUSE=wh)),
              "cannot import torch")
    (tmp_path / "wh" / "requirements-offline.txt").write_text("# python: 3.7 (CPython, manylinux x86_64)\n")
    _one_line(_run(["bash", str(SETUP_ENV)], env=_env(PYTHON=str(py), FAKE_TORCH="1", MOETRAIN_WHEELHOUSE=wh)),
              f"holds wheels for Python 3.7 but {py} is {PYVER}")
    assert not log.exists()  # refused before any pip call


def test_make_wheelhouse_refusals(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.whl").write_text("")
    for args, needle in [(["--python", "3"], "is not a version like 3.12"),
                         (["--python"], "--python needs a version"),
                         (["--only", "tqdm,torch", "--out", str(tmp_path / "new")], "'torch' is none of"),
                         (["--out", str(tmp_path / "full")], "is not empty"),
                         (["--bogus"], "unknown argument")]:
        _one_line(_run(["bash", str(MAKE), *args], timeout=30), needle)
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- with PyPI


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    if not _pypi_reachable():
        pytest.skip("PyPI (https://pypi.org) did not answer within 3 s: make_wheelhouse.sh downloads from it")
    out = tmp_path_factory.mktemp("wh") / "wheelhouse"
    p = _run(["bash", str(MAKE), "--only", "tqdm,omegaconf,deepspeed", "--out", str(out)])
    assert p.returncode == 0, p.stderr
    assert f"for CPython {PYVER} manylinux x86_64 in {out}" in p.stdout
    return out


def test_wheelhouse_contents(wheelhouse):
    names = sorted(f.name for f in wheelhouse.glob("*.whl"))
    assert "deepspeed-0.19.8-py3-none-any.whl" in names  # built from its sdist
    assert any(re.match(r"antlr4_python3_runtime-4\.9\.\d+-py3-none-any\.whl", n) for n in names)
    tag = "cp" + PYVER.replace(".", "")
    for pkg in ("tqdm", "omegaconf", "setuptools", "wheel", "pydantic", "py_cpuinfo"):  # deepspeed's deps too
        assert any(n.startswith(pkg + "-") for n in names), (pkg, names)
    for pkg in ("numpy", "pyyaml", "pydantic_core"):  # binary: this Python, manylinux
        assert any(n.startswith(pkg + "-") and f"-{tag}-" in n and "manylinux" in n for n in names), (pkg, names)
    assert not [n for n in names if TORCHLIKE.match(n)], names
    listing = (wheelhouse / "requirements-offline.txt").read_text().splitlines()
    assert listing[0].startswith(f"# python: {PYVER} ")
    assert len(listing) - 1 == len(names) and "deepspeed==0.19.8" in listing


def test_wheelhouse_for_another_python(pypi, tmp_path):
    out = tmp_path / "wh"
    p = _run(["bash", str(MAKE), "--python", OTHER_PYVER, "--only", "omegaconf,mpi4py", "--out", str(out)])
    assert p.returncode == 0, p.stderr
    names = [f.name for f in out.glob("*.whl")]
    tag = "cp" + OTHER_PYVER.replace(".", "")
    assert any(n.startswith("pyyaml-") and f"-{tag}-{tag}-manylinux" in n for n in names), names
    assert any(n.startswith("antlr4_python3_runtime-") and n.endswith("-py3-none-any.whl") for n in names), names
    # mpi4py: a binary wheel when PyPI has one for that Python, else left out with a warning.
    assert any(n.startswith("mpi4py-") and f"-{tag}-" in n for n in names) or "WARNING: no mpi4py" in p.stderr


def test_offline_install_into_plain_venv(wheelhouse, tmp_path):
    """setup_env.sh itself, offline, into a venv without system site-packages, on a small stand-in
    project (deps tqdm, dev extra omegaconf; the full set is tested by hand): everything comes from
    the wheelhouse, pip's isolated build of the project included, and no index is asked."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    proj = tmp_path / "proj"
    (proj / "tools").mkdir(parents=True)
    shutil.copy(SETUP_ENV, proj / "tools" / "setup_env.sh")
    (proj / "offline_probe.py").write_text("")
    (proj / "setup.py").write_text(
        'from setuptools import setup\nsetup(name="offline-probe", version="0.1", py_modules=["offline_probe"],'
        ' install_requires=["tqdm"], extras_require={"dev": ["omegaconf"]})\n')
    # The only package indexes pip is given (environment beats pip.conf) record every request and
    # answer 404: pip would quietly fall back to the find-links, so count the requests instead.
    asked: list[str] = []

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    index = f"http://127.0.0.1:{server.server_address[1]}/simple"
    env = _env(PYTHON=str(vpy), MOETRAIN_WHEELHOUSE=str(wheelhouse), MOETRAIN_MPI="skip",
               PIP_INDEX_URL=index, PIP_EXTRA_INDEX_URL=index, PIP_RETRIES="0")
    setup = ["bash", str(proj / "tools" / "setup_env.sh")]
    # No torch in the venv: refused in one line, nothing installed.
    _one_line(_run(setup, env=env), "cannot import torch")
    # A stand-in torch distribution (the GPU node's CUDA torch): satisfies deepspeed's torch>=2.0.
    site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text('__version__ = "2.13.0"\n')
    dist = site / "torch-2.13.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n")
    (dist / "RECORD").write_text("")
    try:
        p = _run(setup, env=env)
    finally:
        server.shutdown()
    assert p.returncode == 0, p.stdout + p.stderr
    assert asked == [], asked  # --no-index: no index was even tried
    got = json.loads(_run([str(vpy), "-c", "import importlib.metadata as m, json; print(json.dumps("
                                           "{d.metadata['Name'].lower(): d.version for d in m.distributions()}))"]).stdout)
    assert got["deepspeed"] == "0.19.8" and got["torch"] == "2.13.0"  # torch untouched
    assert {"offline-probe", "tqdm", "omegaconf", "pydantic", "numpy"} <= set(got), got
    assert _run([str(vpy), "-c", "import omegaconf, tqdm, yaml, offline_probe"]).returncode == 0
