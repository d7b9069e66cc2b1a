# Sourced by bench/gpu.sh and bench/gpu_stack.sh on the device machine: make the packages the platform
# needs and the device image lacks importable (the image has torch, numpy, scipy, pandas, pyarrow, ...).
#   .device/site-py312.tar.xz  built here by bench/build_device_site.sh; carried with carry=[".device"]
#   .whl/*.whl                 the older way (device notes): a few wheels installed with pip --target
# Both go to /tmp/site, which is put first on PYTHONPATH.
# Only the archive built for this python3's version is used (compiled parts must match it).
SITE=${SITE:-/tmp/site}
SITE_ARCHIVE=.device/site-$(python3 -c 'import sys; print("py%d%d" % sys.version_info[:2])').tar.xz
if [ -f "$SITE_ARCHIVE" ] && [ ! -f "$SITE/.unpacked" ]; then
  t=$(date +%s)
  mkdir -p "$SITE"
  tar -xJf "$SITE_ARCHIVE" -C "$SITE"
  touch "$SITE/.unpacked"
  echo "unpacked $SITE_ARCHIVE into $SITE in $(($(date +%s) - t)) s ($(du -sm "$SITE" | cut -f1) MB)"
elif [ ! -f "$SITE_ARCHIVE" ] && compgen -G ".device/site-*.tar.xz" >/dev/null; then
  echo "note: no $SITE_ARCHIVE for this python3 ($(python3 -V)); not using $(ls .device/site-*.tar.xz)"
fi
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
if [ -d "$SITE" ]; then
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/platform${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
