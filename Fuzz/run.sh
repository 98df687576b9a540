#!/usr/bin/env bash
# Builds Ferry's libFuzzer targets (swiftc -sanitize=fuzzer,address, -D FUZZING) from the
# same files the test suite replays the corpus with (Tests/FerryTests/Fuzz/), and runs each
# for a bounded time on the committed seeds and corpus. New inputs that add coverage go to
# Fuzz/corpus/<target>/ (merge them with -merge=1 before committing); a crash input lands in
# Fuzz/crashes/ and, once fixed, belongs in Fuzz/regressions/<target>/ (replayed by
# `swift test`). A table of runs, speed and coverage goes to bench-results/fuzz.md.
# Usage: Fuzz/run.sh [SECONDS-PER-TARGET] [TARGET...]   (default 600 s; stream return-path qmp)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}; shift || true
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(stream return-path qmp)
out=.build/fuzz; mkdir -p "$out" Fuzz/crashes bench-results
wire=(Sources/FerryWire/*.swift)
t=Tests/FerryTests/Fuzz
build() { # name sources...
  local name=$1; shift
  swiftc -sanitize=fuzzer,address -parse-as-library -O -D FUZZING -module-name "Fuzz_${name//-/_}" "$@" -o "$out/$name" 2>&1 \
    | grep -v "ld.gold: warning" || true
  [ -x "$out/$name" ]
}
report=${FUZZ_REPORT:-bench-results/fuzz.md}
echo "# Fuzzing ($(date -u +%Y-%m-%dT%H:%MZ), $secs s per target)" > "$report"
echo "| target | runs | exec/s | coverage (edges) | features | corpus | crashes |" >> "$report"
echo "|---|---|---|---|---|---|---|" >> "$report"
for name in "${targets[@]}"; do
  case $name in
    stream) build stream "${wire[@]}" $t/StreamFuzzTarget.swift ;;
    return-path) build return-path "${wire[@]}" $t/ReturnPathFuzzTarget.swift ;;
    qmp) build qmp Sources/FerryQMP/JSONStreamSplitter.swift Sources/FerryQMP/QMPRequest.swift $t/QMPFuzzTarget.swift ;;
    *) echo "unknown target $name" >&2; exit 2 ;;
  esac
  corpus=Fuzz/corpus/$name; mkdir -p "$corpus" "Fuzz/seeds/$name"
  log=$out/$name.log
  set +e
  "$out/$name" "$corpus" "Fuzz/seeds/$name" -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
     -print_final_stats=1 -artifact_prefix="Fuzz/crashes/$name-" > "$log" 2>&1
  rc=$?
  set -e
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  eps=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  last=$(grep -E '#[0-9]+.*(cov|DONE)' "$log" | tail -1)
  cov=$(echo "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*' || echo ?)
  ft=$(echo "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*' || echo ?)
  n=$(ls "$corpus" | wc -l)
  crashes=$(ls Fuzz/crashes | grep -c "^$name-" || true)
  echo "| $name | $runs | $eps | $cov | $ft | $n | $crashes (exit $rc) |" >> "$report"
  echo "$name: $runs runs, $eps exec/s, cov $cov, ft $ft, corpus $n, crashes $crashes, exit $rc"
done
cat "$report"
