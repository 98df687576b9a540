#!/usr/bin/env bash
# The README's test command (what .ci/run runs): the suite, the Linux boot test on its own,
# then the suite again under ThreadSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build
# The installable binary (and its man page, completions) that StaticBinaryTests runs.
scripts/build-static.sh
swift test --skip LinuxBootTests --skip QEMUDifferentialTests
# Alone: Debian's kernel decompresses itself for minutes in guest code at ~1.5 M
# instructions a second and needs a core to itself; beside the suite it starves. The
# differential test runs QEMU's and Ferry's guests side by side and compares times too.
swift test --skip-build --filter LinuxBootTests
swift test --skip-build --filter QEMUDifferentialTests
scripts/test-tsan.sh
