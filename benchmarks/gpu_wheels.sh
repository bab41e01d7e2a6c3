#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that the lent GPU machine lacks, for its Python 3.12
# beside its own torch 2.11 and lightning 2.6: torchrl 0.12.0 + tensordict 0.12.4 (the newest pair whose
# compiled extension loads with torch 2.11; torchrl 0.14.1 fails there with "SumSegmentTreeFp32 is not
# available"), their small dependencies, gymnasium with Box2D (and pygame-ce, which its box2d package imports), and jsonargparse[signatures] for the CLI.
#
#   bash benchmarks/gpu_wheels.sh        # here, with network access to PyPI
#
# Then `bash benchmarks/gpu_smoke.sh` on the GPU machine, carrying .whl (about 9 MB).
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
wheels=(
  torchrl==0.12.0 tensordict==0.12.4 pyvers==0.2.3 hoptorch==0.1.4 orjson==3.13.0 importlib_metadata==8.7.0
  gymnasium==1.4.0 farama-notifications==0.0.6 box2d==2.3.10 pygame-ce==2.5.8
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$dest" "${wheels[@]}"
ls -1 "$dest"
