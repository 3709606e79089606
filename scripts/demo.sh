#!/usr/bin/env bash
# The main job: a local demo network on 127.0.0.1 (bootstrap server + 3 nodes) sharing a file.
source "$(dirname "$0")/env.sh"
exec .venv/bin/python scripts/demo.py "$@"
