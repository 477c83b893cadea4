#!/usr/bin/env bash
# Screenshot a run's report.html in headless Chromium (Debian: apt-get install chromium).
# usage: scripts/screenshot_report.sh RUN_DIR [OUT_PNG] [WIDTH,HEIGHT]
# Writes RUN_DIR/report.html first (fl_ci.report.write_report) when it is missing.
set -euo pipefail
run=${1:?usage: $0 RUN_DIR [OUT_PNG] [WIDTH,HEIGHT]}
png=${2:-$run/report.png}
size=${3:-1200,2000}
python=${PYTHON:-python}
browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z $browser ]]; then
  echo "chromium not found (Debian: apt-get install chromium)" >&2
  exit 3
fi
if [[ ! -f $run/report.html ]]; then
  "$python" -c 'import sys; from pathlib import Path; from fl_ci.report import write_report; write_report(Path(sys.argv[1]))' "$run"
fi
page=$(cd "$run" && pwd)/report.html
out=$(cd "$(dirname "$png")" && pwd)/$(basename "$png")
# no sandbox: root in a container has none; a private profile keeps runs apart
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --user-data-dir="$profile" --window-size="$size" --screenshot="$out" \
  "file://$page" >/dev/null 2>&1
test -s "$out"
echo "$out"
