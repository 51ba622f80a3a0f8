#!/usr/bin/env bash
# The hash of what the compiled extension is built from (every file under csrc/, and setup.py) in the
# tree DIR (default: this checkout): prebuild_for_device.sh records it, gpu_check.sh compares it.
set -euo pipefail
cd "${1:-$(dirname "$0")/..}"
find csrc setup.py -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
