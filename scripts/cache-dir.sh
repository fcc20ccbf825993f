#!/usr/bin/env bash
# Prints ferry's cache directory (outside the clone), creating it: $FERRY_CACHE, else
# $XDG_CACHE_HOME/ferry, else ~/.cache/ferry.
set -euo pipefail
dir=${FERRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}
mkdir -p "$dir"
echo "$dir"
