#!/usr/bin/env bash
# The GPU check (platform/panacea_platform/diagnostics/gpu_check.py): Panacea against SFT under DeepSpeed ZeRO-2,
# and the evaluation decoder against HF generate(), on a random-weight Llama-2-7B, on one GPU.
#
#   bash scripts/gpu_check.sh --prepare          here, with PyPI: wheels for the GPU machine -> wheels/gpu
#   bash scripts/gpu_check.sh [check options]    on the GPU machine, from the repo root, offline;
#                                                options go to the check, e.g. --json "$OUT/gpu_check.json"
#   bash scripts/gpu_check.sh --install-only     install what is missing (no GPU needed) and stop
#
# The GPU machine is assumed to have PyTorch, transformers, peft and accelerate, and no internet.
# --prepare builds DeepSpeed (no ops compiled) and downloads the small packages it and the platform's
# imported modules need, plus transformers/peft/accelerate and their dependencies at this .venv's
# versions, for when the machine's are older than pyproject.toml allows. The run installs only what
# the machine's Python lacks (or has too old), into wheels/site, never into the machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=wheels/gpu
SITE=wheels/site
MAX_MIB=64
# Binary wheels (pydantic-core, msgpack, regex, pyyaml...) are per Python version: the GPU
# machine's is not known here, so every likely one is fetched.
PY_VERSIONS=${GPU_CHECK_PY_VERSIONS:-"3.10 3.11 3.12 3.13"}
ARCH=${GPU_CHECK_ARCH:-x86_64}
# Soft budget of the check itself (it shortens its timed loops past it) and the hard limit.
BUDGET_S=${GPU_CHECK_BUDGET_S:-300}
TIMEOUT_S=${GPU_CHECK_TIMEOUT_S:-420}

die() { echo "gpu_check.sh: ERROR: $*" >&2; exit 1; }

# -- here: build and download the wheels -------------------------------------------------------------

# name==version of everything the roots need, from .venv's installed metadata, minus what every
# PyTorch machine has (torch, numpy and CUDA runtime packages) and deepspeed (built separately).
closure() {
  .venv/bin/python - "$@" <<'PY'
import importlib.metadata as md, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

skip = {"torch", "numpy", "triton"}
seen, stack = {}, list(sys.argv[1:])
while stack:
    name = canonicalize_name(stack.pop())
    if name in seen or name in skip or name.startswith("nvidia-"):
        continue
    dist = md.distribution(name)
    seen[name] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            stack.append(req.name)
seen.pop("deepspeed", None)  # its dependencies count; the wheel itself is built
print("\n".join(f"{n}=={v}" for n, v in sorted(seen.items())))
PY
}

# The run's top-level requirements: pyproject.toml's ranges, DeepSpeed pinned to the wheel built.
top_requirements() {
  .venv/bin/python - "$1" <<'PY'
import sys, tomllib
from packaging.requirements import Requirement

wanted = {"pydantic", "pyyaml", "transformers", "peft", "accelerate"}
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
lines = [d for d in deps if Requirement(d).name.lower() in wanted]
print("\n".join([f"deepspeed=={sys.argv[1]}", *lines]))
PY
}

download_binaries() {
  local requirements=$1 version abi failed=()
  local platforms=(--platform "manylinux2014_$ARCH" --platform "manylinux_2_17_$ARCH" --platform "manylinux_2_28_$ARCH")
  for version in $PY_VERSIONS; do
    abi="cp${version/./}"
    local pip_dl=(.venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all:
                  --dest "$WHEELS" --python-version "$version" --implementation cp --abi "$abi" "${platforms[@]}")
    echo "prepare: wheels for Python $version"
    if ! "${pip_dl[@]}" -r "$requirements" 2>/dev/null; then
      # One package without a wheel for this Python must not cost the others theirs.
      while read -r req; do
        "${pip_dl[@]}" "$req" 2>/dev/null || failed+=("$req (Python $version)")
      done < "$requirements"
    fi
  done
  if ((${#failed[@]})); then
    printf 'prepare: WARNING: no wheel for %s\n' "${failed[@]}" >&2
  fi
}

prepare() {
  [[ -x .venv/bin/python ]] || die "no .venv: run scripts/setup.sh first"
  local ds_version
  ds_version=$(.venv/bin/python -c "import deepspeed; print(deepspeed.__version__)" 2>/dev/null | tail -1)
  [[ -n $ds_version ]] || die "cannot import deepspeed from .venv"
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  echo "prepare: building deepspeed $ds_version (DS_BUILD_OPS=0: no ops compiled; the check needs none)"
  # No build isolation: DeepSpeed's setup.py imports torch, and an isolated build would download one.
  DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$WHEELS" "deepspeed==$ds_version"
  top_requirements "$ds_version" > "$WHEELS/requirements.txt"
  local deps
  deps=$(mktemp)
  closure deepspeed pydantic pyyaml transformers peft accelerate > "$deps"
  echo "prepare: $(wc -l < "$deps") dependency packages at .venv's versions"
  download_binaries "$deps"
  rm -f "$deps"
  echo "prepare: wheels in $WHEELS (MiB):"
  ls -l "$WHEELS" | awk 'NR > 1 && /\.whl$/ {printf "  %7.2f  %s\n", $5 / 1048576, $9}'
  local total_kib
  total_kib=$(du -sk "$WHEELS" | cut -f1)
  echo "prepare: total $((total_kib / 1024)) MiB ($(ls "$WHEELS"/*.whl | wc -l) wheels; limit $MAX_MIB MiB)"
  ((total_kib <= MAX_MIB * 1024)) || die "wheels take $((total_kib / 1024)) MiB, over $MAX_MIB MiB"
  echo "prepare: done. On the GPU machine, from the repo root: bash scripts/gpu_check.sh [--json PATH]"
}

# -- there: install what is missing, run the check ---------------------------------------------------

# Which wheels of $WHEELS this Python needs: each requirement (and its dependencies, recursively) that
# is not installed at a version in range gets the newest matching wheel for this interpreter.
missing_wheels() {
  PYTHONPATH="$SITE" "$PYTHON" - "$WHEELS" <<'PY'
import importlib.metadata as md, importlib.util, sys, zipfile
from email.parser import Parser
from pathlib import Path
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

folder = Path(sys.argv[1])
rank = {tag: i for i, tag in enumerate(sys_tags())}  # lower = better for this interpreter
wheels = {}
for path in folder.glob("*.whl"):
    name, version, _, tags = parse_wheel_filename(path.name)
    fits = [rank[t] for t in tags if t in rank]
    if fits:
        wheels.setdefault(name, []).append((version, -min(fits), path))

def installed(name):
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        # Torch built from source may lack metadata; an importable torch is taken as it is.
        return Version("999") if name in ("torch", "numpy") and importlib.util.find_spec(name) else None

def requires(path):
    with zipfile.ZipFile(path) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(archive.read(meta).decode()).get_all("Requires-Dist") or []

chosen, stack = {}, [Requirement(l) for l in (folder / "requirements.txt").read_text().split("\n") if l.strip()]
while stack:
    req = stack.pop()
    name = canonicalize_name(req.name)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    have = chosen[name][0] if name in chosen else installed(name)
    if have is not None and req.specifier.contains(have, prereleases=True):
        continue
    if name in chosen:
        sys.exit(f"{req} conflicts with the {name} {have} already chosen")
    fitting = [w for w in wheels.get(name, []) if req.specifier.contains(w[0], prereleases=True)]
    if not fitting:
        sys.exit(f"{req}: this Python has {name} {have or '(none)'} and {folder} has no wheel for it "
                 f"(Python {sys.version.split()[0]}); run --prepare with GPU_CHECK_PY_VERSIONS including it")
    version, _, path = max(fitting)
    chosen[name] = (version, path)
    stack.extend(Requirement(text) for text in requires(path))
print("\n".join(str(path) for _, path in chosen.values()))
PY
}

install_wheels() {
  local list
  list=$(missing_wheels) || die "the wheels in $WHEELS do not cover this machine (message above)"
  if [[ -z $list ]]; then
    echo "gpu_check.sh: every requirement is already installed"
    return
  fi
  echo "gpu_check.sh: installing into $SITE: $(echo "$list" | xargs -n1 basename | tr '\n' ' ')"
  mkdir -p "$SITE"
  if "$PYTHON" -m pip --version > /dev/null 2>&1; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --upgrade --target "$SITE" $list \
      || die "pip could not install the wheels into $SITE"
  else
    # No pip: a wheel is a zip of what goes on sys.path.
    echo "$list" | while read -r wheel; do "$PYTHON" -m zipfile -e "$wheel" "$SITE"; done
  fi
}

# The first of $PYTHON, python3, python that imports torch.
find_python() {
  local candidate
  for candidate in ${PYTHON:-} python3 python; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON=$(command -v "$candidate")
      break
    fi
  done
  [[ -n ${PYTHON:-} ]] && "$PYTHON" -c "import torch" 2>/dev/null \
    || die "no Python on PATH imports torch (set PYTHON=/path/to/python)"
  [[ -f $WHEELS/requirements.txt ]] \
    || die "no $WHEELS: run 'bash scripts/gpu_check.sh --prepare' where PyPI is reachable and bring $WHEELS along"
  "$PYTHON" -c "import packaging" 2>/dev/null \
    || die "$PYTHON cannot import packaging (transformers needs it: is transformers installed?)"
}

run_check() {
  find_python
  if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    die "CUDA is not available to $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), \
torch.cuda.is_available() is False): this check needs a GPU"
  fi
  install_wheels
  export PYTHONPATH="platform:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  echo "gpu_check.sh: running the check (budget ${BUDGET_S} s, hard limit ${TIMEOUT_S} s)"
  local status=0
  timeout --signal=INT --kill-after=20 "$TIMEOUT_S" "$PYTHON" -m panacea_platform.diagnostics.gpu_check --budget-s "$BUDGET_S" "$@" \
    || status=$?
  # timeout exits 124 when it stopped the check, 137 when it had to kill it.
  ((status != 124 && status != 137)) \
    || die "the check ran past ${TIMEOUT_S} s and was stopped (its progress lines above show where)"
  ((status == 0)) || die "the check failed (exit status $status)"
}

case ${1:-} in
  --prepare) prepare ;;
  --install-only) find_python && install_wheels ;;
  *) run_check "$@" ;;
esac
