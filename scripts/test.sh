#!/usr/bin/env bash
# The whole test suite, slow multi-node tests included: bash scripts/test.sh [pytest args]
source "$(dirname "$0")/env.sh"
exec .venv/bin/python -m pytest "$@"
