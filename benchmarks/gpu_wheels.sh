#!/usr/bin/env bash
# Wheels for the end-to-end part of gpu_issue15.py on a GPU machine that has JAX, Flax,
# Optax and PyTorch but not the zoo's data and config packages (which zoo.training imports
# at start-up): downloaded here, for CPython 3.12 on x86-64 Linux, into .whl/ (about 12 MB).
#
#   bash benchmarks/gpu_wheels.sh            # here, where PyPI is reachable
#   # there, before the run (PYTHONPATH first, so these win):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Versions: those the zoo is tested with. `promise` has no wheel on PyPI: one is built
# from its source archive (pure Python). Keep .whl/ out of git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PYTHON:-python3}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 tensorflow-datasets==4.9.10 \
  tensorflow-metadata==1.21.0 tensorboardX==2.6.5 mlxtend==0.25.0 immutabledict==4.3.1 \
  toml==0.10.2 portpicker==1.6.0
"$PY" -m pip wheel --no-deps -w .whl promise==2.3
ls -la .whl
du -sh .whl
