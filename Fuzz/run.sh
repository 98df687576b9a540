#!/usr/bin/env bash
# Builds Ferry's libFuzzer targets (swiftc -sanitize=fuzzer,address) and runs each for a
# bounded time on a copy of the committed seed corpus. Crashes land in Fuzz/crashes/ and
# each must become a regression input in Fuzz/regressions/<target>/ (the test suite
# replays those).
# Usage: Fuzz/run.sh [SECONDS-PER-TARGET] [TARGET...]   (default 600 s, all targets)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}; shift || true
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(stream return-path qmp)
out=.build/fuzz; mkdir -p "$out" Fuzz/crashes bench-results
wire=(Sources/FerryWire/*.swift)
build() { # name sources...
  local name=$1; shift
  swiftc -sanitize=fuzzer,address -parse-as-library -O -module-name "Fuzz_${name//-/_}" "$@" -o "$out/$name" 2>&1 | grep -v "ld.gold: warning" || true
  [ -x "$out/$name" ]
}
report=bench-results/fuzz.md
echo "# Fuzzing ($(date -u +%Y-%m-%dT%H:%MZ), $secs s per target)" > "$report"
echo "| target | runs | exec/s | coverage (edges) | features | corpus | crashes |" >> "$report"
echo "|---|---|---|---|---|---|---|" >> "$report"
for t in "${targets[@]}"; do
  case $t in
    stream) build stream "${wire[@]}" Fuzz/StreamDecoderFuzz.swift ;;
    return-path) build return-path "${wire[@]}" Fuzz/ReturnPathFuzz.swift ;;
    qmp) build qmp Sources/FerryQMP/JSONStreamSplitter.swift Sources/FerryQMP/QMPRequest.swift Fuzz/QMPParserFuzz.swift ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  corpus=$out/corpus-$t; mkdir -p "$corpus"
  log=$out/$t.log
  set +e
  "$out/$t" "$corpus" "Fuzz/seeds/$t" -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
     -print_final_stats=1 -artifact_prefix=Fuzz/crashes/$t- > "$log" 2>&1
  rc=$?
  set -e
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  eps=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  last=$(grep -E '#[0-9]+.*(cov|DONE)' "$log" | tail -1)
  cov=$(echo "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*' || echo ?)
  ft=$(echo "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*' || echo ?)
  n=$(ls "$corpus" | wc -l)
  crashes=$(ls Fuzz/crashes | grep -c "^$t-" || true)
  echo "| $t | $runs | $eps | $cov | $ft | $n | $crashes (exit $rc) |" >> "$report"
  echo "$t: $runs runs, $eps exec/s, cov $cov, ft $ft, corpus $n, crashes $crashes, exit $rc"
done
cat "$report"
