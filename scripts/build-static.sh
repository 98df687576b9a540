#!/usr/bin/env bash
# An installable ferry in dist/: the Swift runtime and Foundation linked in
# (--static-swift-stdlib), so it runs where no Swift toolchain is installed (it needs
# glibc, libssl3 and libzstd1, as Debian has them); its man page, generated from the
# argument parser (the package's generate-manual plugin), and bash/zsh/fish completions.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=.build-static
swift build -c release --static-swift-stdlib --product ferry --scratch-path "$scratch"
rm -rf dist && mkdir -p dist/completions dist/man
cp "$scratch/release/ferry" dist/ferry
dist/ferry --generate-completion-script bash > dist/completions/ferry.bash
dist/ferry --generate-completion-script zsh > dist/completions/_ferry
dist/ferry --generate-completion-script fish > dist/completions/ferry.fish
swift package --scratch-path "$scratch" plugin generate-manual --product ferry >/dev/null
cp "$scratch/plugins/GenerateManual/outputs/ferry/ferry.1" dist/man/ferry.1
ls -l dist/ferry dist/man/ferry.1 dist/completions
