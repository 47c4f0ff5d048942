#!/usr/bin/env bash
# Checks the confab alert rules and runs their promtool unit tests.
# Needs promtool (Debian: apt-get install prometheus); amtool is used for the
# Alertmanager example when it is installed.
set -euo pipefail

cd "$(dirname "$0")"

promtool check rules confab-rules.yml

shopt -s nullglob
tests=(*test*.yml)
if [ ${#tests[@]} -eq 0 ]; then
  echo "no *test*.yml file in $(pwd)" >&2
  exit 1
fi
promtool test rules "${tests[@]}"

if command -v amtool >/dev/null 2>&1; then
  amtool check-config alertmanager.example.yml
else
  echo "amtool not found: alertmanager.example.yml not checked" >&2
fi
