#!/usr/bin/env bash
# Downloads into .whl/ the wheels scripts/gpu_check.sh needs on a GPU machine that has torch,
# Triton, tokenizers, accelerate, httpx, pillow, pytest... but not this server's own packages
# and no network: CPython 3.12, manylinux x86_64, the versions this checkout's .venv runs.
#   bash scripts/fetch_gpu_wheels.sh      (on a machine with PyPI; then carry .whl/ across)
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv
  annotated-types annotated-doc typing-inspection typing-extensions uvicorn asgi-lifespan sniffio
  opentelemetry-api xgrammar apache-tvm-ffi transformers fastapi-offline regex python-multipart
  anyio h11)  # (anyio, h11: on the image too, at versions not checked)
PIP=".venv/bin/pip"
pinned=()
for name in "${PACKAGES[@]}"; do
  version=$($PIP show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  pinned+=("$name${version:+==$version}")
done
rm -rf .whl && mkdir -p .whl
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pinned[@]}"
du -sh .whl
