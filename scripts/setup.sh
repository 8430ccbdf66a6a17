#!/usr/bin/env bash
# Create .venv/ in the project root and install cqpolicy with its test extras (idempotent).
# torch 2.14.1 / torchvision 0.29.1 are pinned: pip takes both from this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages, as root: Fashion-MNIST (needed only to retrain models and by one data test) and PostgreSQL (the
# test of several Optuna workers and an MLflow server on one database; it skips without it)
packages=()
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ -z "${CQPOLICY_FASHION_MNIST:-}" ]; then
  packages+=(dataset-fashion-mnist)
fi
if ! command -v initdb >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  packages+=(postgresql)
fi
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
  else
    echo "note: for training scripts and the PostgreSQL test run: sudo apt-get install -y ${packages[*]}" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# Optional peers for side-by-side benches (their own deps would move torch: --no-deps).
.venv/bin/python -m pip install -q --no-deps dit-smoothcache DeepCache==0.1.1 cache-dit==1.5.3
