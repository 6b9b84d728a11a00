#!/usr/bin/env bash
# Set up (system packages, .venv with test extras) and run the test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the
# fast set alone.
set -euo pipefail
cd "$(dirname "$0")/.."
CKFS_EXTRAS=fuse,grpc,test bash scripts/bootstrap.sh
# pytest exits 5 when it collects nothing; that must fail, so it is not masked.
exec .venv/bin/python -m pytest "$@"
