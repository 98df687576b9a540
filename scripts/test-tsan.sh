#!/usr/bin/env bash
# The whole test suite again under ThreadSanitizer. Any report is a failure: TSan stops the
# run at the first one (halt_on_error), and the log is checked for reports as well.
# Sanitized threads run several times slower, so the tests scale their heartbeat timeouts
# (FERRY_TEST_TIME_SCALE); the ferry processes some tests start are the normal debug build.
# The Linux boot test is left to the plain run: it spends minutes in guest code (one core
# busy) and exercises no thread of Ferry's that the other tests do not.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=.build-tsan
log=$(mktemp /tmp/ferry-tsan.XXXXXX.log)
swift build --build-tests --sanitize=thread --scratch-path "$scratch"
set +e
FERRY_TEST_TIME_SCALE=4 TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
  swift test --skip-build --sanitize=thread --scratch-path "$scratch" --skip LinuxBootTests --skip QEMUDifferentialTests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
reports=$(grep -c "WARNING: ThreadSanitizer" "$log" || true)
echo "ThreadSanitizer reports: $reports"
if [ "$reports" != 0 ]; then exit 1; fi
exit "$status"
