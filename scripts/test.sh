#!/usr/bin/env bash
# The README's test command (what .ci/run runs): the suite, the Linux boot test on its own,
# then the suite again under ThreadSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build
swift test --skip LinuxBootTests
# Alone: Debian's kernel decompresses itself for minutes in guest code at ~1.5 M
# instructions a second and needs a core to itself; beside the suite it starves.
swift test --skip-build --filter LinuxBootTests
scripts/test-tsan.sh
