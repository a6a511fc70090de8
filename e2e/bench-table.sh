#!/usr/bin/env bash
# bench-table.sh LOG: the `BENCH name=… value=… unit=… goal=… verdict=…`
# lines of LOG as one table. Fails if LOG holds no figure at all.
set -euo pipefail
lines=$(grep -E '^BENCH ' "${1:?usage: bench-table.sh LOG}" || true)
[ -n "$lines" ] || { echo "no BENCH lines in $1" >&2; exit 1; }
printf '%-44s %14s %-6s %-14s %s\n' name value unit goal verdict
while IFS= read -r l; do
  get() { sed -nE "s/.* $1=([^ ]*).*/\\1/p" <<<"$l"; }
  printf '%-44s %14s %-6s %-14s %s\n' "$(get name)" "$(get value)" "$(get unit)" "$(get goal)" "$(get verdict)"
done <<<"$lines"
missed=$(grep -c 'verdict=missed' <<<"$lines" || true)
echo "$(wc -l <<<"$lines") figures, $missed goals missed"
