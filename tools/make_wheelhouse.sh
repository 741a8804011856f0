#!/usr/bin/env bash
# Build a directory of wheels ("wheelhouse") with everything tools/setup_env.sh installs except
# torch, for GPU nodes without a package index. Run it where PyPI is reachable, copy the directory
# to the node, then: MOETRAIN_WHEELHOUSE=DIR bash tools/setup_env.sh (keeps the node's torch).
#   bash tools/make_wheelhouse.sh [--python 3.12] [--out DIR] [--only NAME,NAME...]
# Target: CPython --python (default: this python3's) on manylinux x86_64. --only keeps a subset of
# REQS (the tests use it). Works with any pip config (index mirrors, find-links, constraints).
set -euo pipefail
PY=${PYTHON:-python3}
die() { echo "make_wheelhouse: $*" >&2; exit 1; }

# What setup_env.sh installs besides torch: setup.py's install_requires and extras (dev, deepspeed,
# mpi, gpu, hf) with setup_env.sh's pins. Keep in sync (tests/tools/test_wheelhouse.py checks).
REQS=("omegaconf>=2.3" "tensorboard>=2.14" "tqdm>=4.60" "numpy>=1.24" "pytest>=7" "pytest-timeout>=2.1"
      "matplotlib>=3.7" "safetensors>=0.4" "transformers>=5.0,<6" "tokenizers>=0.21" "pyarrow>=15"
      "deepspeed==0.19.8" "mpi4py>=4" "mpich>=4" "nvidia-ml-py>=12")
# The offline `pip install -e .` builds moetrain in pip's isolated build env, which then also
# installs from the wheelhouse: ship the setuptools build backend.
EXTRA=(setuptools wheel)
# torch's manylinux wheels need glibc >= 2.28, so a node running torch takes wheels up to that.
GLIBC_MAX=28

PYVER=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
OUT=$(CDPATH= cd "$(dirname "$0")/.." && pwd)/wheelhouse ONLY=  # a relative --out: the caller's
while [ $# -gt 0 ]; do
  case $1 in
    --python) PYVER=${2:-}; shift 2 || die "--python needs a version like 3.12" ;;
    --out) OUT=${2:-}; shift 2 || die "--out needs a directory" ;;
    --only) ONLY=${2:-}; shift 2 || die "--only needs names like tqdm,deepspeed" ;;
    *) die "unknown argument '$1' (usage: make_wheelhouse.sh [--python 3.12] [--out DIR] [--only NAME,...])" ;;
  esac
done
[[ $PYVER =~ ^3\.[0-9]+$ ]] || die "--python '$PYVER' is not a version like 3.12"
NAMES=" ${REQS[*]%%[<>=]*} "
for name in ${ONLY//,/ }; do
  [[ $NAMES == *" $name "* ]] || die "--only: '$name' is none of:${NAMES% }"
done
[ -n "$OUT" ] || die "--out needs a directory"
# Never mix two builds (another Python version, stale wheels): start from an empty directory.
[ ! -e "$OUT" ] || [ -z "$(ls -A "$OUT")" ] || die "$OUT is not empty: remove it or pass another --out"

# Sort the requirements: deepspeed and antlr4-python3-runtime (omegaconf's) are published only as
# sdists, pure Python: build them here into py3-none-any wheels, which install on any Python 3.
# mpi4py may have no binary wheel for the target; clusters build it against their MPI anyway.
BUILD=() DOWNLOAD=("${EXTRA[@]}") MPI4PY=
for req in "${REQS[@]}"; do
  name=${req%%[<>=]*}
  [ -z "$ONLY" ] || [[ ,$ONLY, == *,$name,* ]] || continue
  case $name in
    deepspeed) BUILD+=("$req") ;;
    omegaconf) BUILD+=("antlr4-python3-runtime==4.9.*"); DOWNLOAD+=("$req") ;;  # omegaconf 2.3 pins 4.9.*
    mpi4py) MPI4PY=$req ;;
    *) DOWNLOAD+=("$req") ;;
  esac
done

mkdir -p "$OUT"
OUT=$(CDPATH= cd "$OUT" && pwd)
# $OUT started empty: on failure empty it again, so that a rerun can go ahead.
trap '[ $? -eq 0 ] || rm -f "$OUT"/*.whl "$OUT"/requirements-offline.txt' EXIT
TMP=$(mktemp -d)
LOG=$TMP/pip.log
# pip's output goes to $LOG (kept on failure); a failure is one line with pip's first error.
pip_run() { # WHAT ARGS...
  local what=$1; shift
  $PY -m pip "$@" >>"$LOG" 2>&1 ||
    die "$what failed: $( (grep '^ERROR' "$LOG" | grep -v '^ERROR: Ignored' || tail -1 "$LOG") | head -1 | cut -c1-300) (full log: $LOG)"
}
TAGS=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}")
for v in $(seq "$GLIBC_MAX" -1 17); do TAGS+=(--platform "manylinux_2_${v}_x86_64"); done
TAGS+=(--platform manylinux2014_x86_64)  # pip adds manylinux2010/manylinux1 for it

if [ ${#BUILD[@]} -gt 0 ]; then
  echo "make_wheelhouse: building wheels from sdists: ${BUILD[*]}" >&2
  pip_run "building ${BUILD[*]}" wheel -q --no-deps -w "$OUT" "${BUILD[@]}"
  for whl in "$OUT"/*.whl; do
    [[ $whl == *-py3-none-any.whl ]] || die "$(basename "$whl") is not a py3-none-any wheel: it would not fit Python $PYVER"
  done
  # Their requirements come next with the rest, except torch (the node has it) and extras.
  $PY - "$OUT"/*.whl >"$TMP/built-reqs.txt" <<'EOF'
import re, sys, zipfile
from email.parser import Parser
for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for req in Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []:
            if "extra ==" not in req and re.match(r"[A-Za-z0-9._-]+", req).group().lower() != "torch":
                print(req)
EOF
else
  : >"$TMP/built-reqs.txt"
fi

# torch<0 makes any path to torch (and its nvidia-*-cu* libraries, triton) a resolver error
# instead of a multi-GB download: the wheelhouse never holds torch.
echo "torch<0" >"$TMP/no-torch.txt"
echo "make_wheelhouse: downloading wheels for CPython $PYVER manylinux x86_64: ${DOWNLOAD[*]}" >&2
pip_run "pip download" download -q "${TAGS[@]}" -d "$OUT" --find-links "$OUT" \
  -c "$TMP/no-torch.txt" -r "$TMP/built-reqs.txt" "${DOWNLOAD[@]}"
if [ -n "$MPI4PY" ] && ! $PY -m pip download -q "${TAGS[@]}" --no-deps -d "$OUT" "$MPI4PY" >>"$LOG" 2>&1; then
  echo "make_wheelhouse: WARNING: no $MPI4PY wheel for CPython $PYVER manylinux x86_64, left out;" \
    "on the node set MOETRAIN_MPI=skip and build mpi4py against the cluster's MPI" >&2
fi

# The listing: one name==version a line (pip install --no-index -f DIR -r this file installs all).
{
  echo "# python: $PYVER (CPython, manylinux x86_64); made by tools/make_wheelhouse.sh; torch not included"
  for whl in "$OUT"/*.whl; do
    f=$(basename "$whl"); n=${f%%-*}; v=${f#*-}; v=${v%%-*}
    echo "$(echo "$n" | tr 'A-Z_.' 'a-z--')==$v"
  done | sort
} >"$OUT/requirements-offline.txt"
rm -rf "$TMP"
n=$(ls "$OUT"/*.whl | wc -l)
echo "make_wheelhouse: $n wheels, $(du -sh "$OUT" | cut -f1), for CPython $PYVER manylinux x86_64 in $OUT"
