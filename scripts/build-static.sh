#!/usr/bin/env bash
# An installable ferry in dist/: the Swift runtime and Foundation linked in
# (--static-swift-stdlib), so it runs where no Swift toolchain is installed (it needs
# glibc, libstdc++, libssl3 and libzstd1, as Debian has them); its man page, generated from the
# argument parser (swift-argument-parser's generate-manual), and bash/zsh/fish completions.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=.build-static
swift build -c release --static-swift-stdlib --product ferry --scratch-path "$scratch"
rm -rf dist && mkdir -p dist/completions dist/man
cp "$scratch/release/ferry" dist/ferry
dist/ferry --generate-completion-script bash > dist/completions/ferry.bash
dist/ferry --generate-completion-script zsh > dist/completions/_ferry
dist/ferry --generate-completion-script fish > dist/completions/ferry.fish
# swift-argument-parser's generate-manual (what its plugin runs), reading ferry's own help.
swift build --product generate-manual --scratch-path "$scratch" >/dev/null
"$(swift build --show-bin-path --scratch-path "$scratch")/generate-manual" dist/ferry --output-directory dist/man
ls -l dist/ferry dist/man/ferry.1 dist/completions
