#!/usr/bin/env bash
# Build the archive of site-packages that the GPU device machine lacks for `multitalent convert` and
# `multitalent train` (Ray Train, DeepSpeed, MLflow to sqlite, Zarr, NIfTI, WebDataset, the networks).
# Runs HERE (network to the package index); the device has none. Output: .device/site-py312.tar.xz
# (ignored by git), carried to the device with run(..., carry=[".device"]) and unpacked there into
# /tmp/site by bench/device_site.sh (bench/gpu.sh and bench/gpu_stack.sh source it).
#
#   bash bench/build_device_site.sh                 # CPython 3.12 x86-64 (the device's python3 is 3.12.3)
#   PY_VERSION=3.11 NO_TAR=1 bash bench/build_device_site.sh   # a 3.11 folder, to rehearse the stack here
#
# Steps (downloads and staging under $WORK, default /tmp/mt-device-site-py312, reused when rerun):
#   1. deepspeed has no wheel on the index: build its pure-Python wheel from the sdist (DS_BUILD_OPS=0);
#   2. resolve bench/device_site_requirements.txt with every dependency for CPython $PY_VERSION on
#      manylinux_2_17..2_28 x86-64 (`pip install --dry-run --report`; the device's torch is a
#      manylinux_2_28 build, so its glibc is at least 2.28);
#   3. leave out what the device image already has (bench/device_packages.txt), download the rest;
#   4. install them with `pip install --no-deps --target` (no bytecode), then strip what the stack does
#      not import (ray's Java jars, RLlib, Serve, LLM, workflow and dashboard UI; every tests/ folder and
#      bytecode cache) and the symbol tables and debug info of shared objects and ray's executables.
#      DeepSpeed's op sources stay (~0.5 MB packed): the platform uses no DeepSpeed op, but if some code
#      path JIT-builds one, the device has nvcc and ninja to do it;
#   5. tar.xz it (xz -9) with a manifest (.site-manifest.txt: packages, versions, build date).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY_VERSION=${PY_VERSION:-3.12}
TAG=py${PY_VERSION/./}
WORK=${WORK:-/tmp/mt-device-site-$TAG}
ARCHIVE=${ARCHIVE:-$REPO/.device/site-$TAG.tar.xz}
NO_TAR=${NO_TAR:-0}
# Any python3 with pip will do (it only downloads and unpacks); one of the target version is preferred.
if [ -z "${PIP_PYTHON:-}" ]; then
  for c in "python$PY_VERSION" "$HOME"/.pyenv/versions/"$PY_VERSION"*/bin/python python3; do
    if "$c" -m pip --version >/dev/null 2>&1; then PIP_PYTHON=$c && break; fi
  done
fi
PLATFORMS=()
for n in $(seq 28 -1 17); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp "${PLATFORMS[@]}")
pip_() { "$PIP_PYTHON" -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: \(Location\|Running pip as\)" >&2); }

mkdir -p "$WORK/wheels"
echo "== $PY_VERSION x86-64 site for the device, staged in $WORK (pip of $PIP_PYTHON)"

# 1. deepspeed from its sdist (pure Python without prebuilt ops)
DS=$(grep -E '^deepspeed==' bench/device_site_requirements.txt)
if ! compgen -G "$WORK/wheels/deepspeed-${DS#deepspeed==}-*.whl" >/dev/null; then
  DS_BUILD_OPS=0 pip_ wheel -q --no-deps -w "$WORK/wheels" "$DS"
fi

# 2. resolve everything (metadata only) for the target interpreter and platform
# what the device has (device notes); a rehearsal build for another Python resolves freely
if [ "$PY_VERSION" = 3.12 ]; then printf 'torch==2.11.0\nnumpy==2.5.2\n'; fi >"$WORK/device-versions.txt"
pip_ install -q --dry-run --ignore-installed --report "$WORK/report.json" "${TARGET[@]}" \
  --find-links "$WORK/wheels" --target "$WORK/resolve" \
  -r bench/device_site_requirements.txt -c "$WORK/device-versions.txt"

# 3. the packages the device lacks
"$PIP_PYTHON" - "$WORK/report.json" bench/device_packages.txt "$WORK/need.txt" <<'EOF'
import json, re, sys
report, device, out = sys.argv[1:]
norm = lambda n: re.sub(r"[-_.]+", "-", n.strip().lower())
have = {norm(x) for x in open(device) if x.strip() and not x.startswith("#")}
need, present = [], []
for item in json.load(open(report))["install"]:
    name, version = norm(item["metadata"]["name"]), item["metadata"]["version"]
    (present if name in have else need).append(f"{name}=={version}")
open(out, "w").write("\n".join(sorted(need)) + "\n")
print(f"resolved {len(need) + len(present)} packages: {len(present)} on the device already, {len(need)} to carry")
EOF
grep -v '^deepspeed==' "$WORK/need.txt" >"$WORK/download.txt"
pip_ download -q --no-deps "${TARGET[@]}" -d "$WORK/wheels" -r "$WORK/download.txt"

# 4. install into a clean folder, then strip
SITE=$WORK/site
rm -rf "$SITE"
pip_ install -q --no-deps --no-index --find-links "$WORK/wheels" --no-compile "${TARGET[@]}" \
  --target "$SITE" -r "$WORK/need.txt"
before=$(du -sm "$SITE" | cut -f1)
rm -rf "$SITE"/ray/{jars,rllib,serve,llm,workflow,setup-dev.py} "$SITE"/ray/dashboard/client
find "$SITE" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
find "$SITE" -type f \( -name '*.so' -o -name '*.so.*' -o -path '*/ray/core/src/*' \) -print0 |
  while IFS= read -r -d '' f; do
    if head -c 4 "$f" | grep -q ELF; then strip --strip-unneeded "$f" 2>/dev/null || true; fi
  done
# console scripts: pip wrote this machine's interpreter into their first line
for f in "$SITE"/bin/*; do
  if head -1 "$f" | grep -q '^#!.*python'; then sed -i '1s|^#!.*|#!/usr/bin/env python3|' "$f"; fi
done
{
  echo "# site-packages for CPython $PY_VERSION x86-64 (manylinux <= 2.28), built $(date -u +%FT%TZ)"
  echo "# by bench/build_device_site.sh from bench/device_site_requirements.txt, minus bench/device_packages.txt"
  cat "$WORK/need.txt"
} >"$SITE/.site-manifest.txt"
echo "site: $(wc -l <"$WORK/need.txt") packages, ${before} MB installed, $(du -sm "$SITE" | cut -f1) MB stripped ($SITE)"
[ "$NO_TAR" = 1 ] && exit 0

# 5. the archive
mkdir -p "$(dirname "$ARCHIVE")"
tar -C "$SITE" -cf - . | xz -9 -T"${XZ_THREADS:-2}" >"$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
echo "archive: $ARCHIVE $(stat -c %s "$ARCHIVE") bytes ($(($(stat -c %s "$ARCHIVE") / 1048576)) MiB)"
