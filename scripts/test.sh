#!/usr/bin/env bash
# The whole test suite (README: "Run the tests"). Used by .ci/run too.
# Python is only needed for the tests that run real third-party clients/parsers (sd-parsers, webuiapi);
# they live in a venv outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/sd-host-target}"
VENV="${SDHOST_TEST_VENV:-/var/tmp/sd-host-test-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import sd_parsers, webuiapi, jsonschema" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tools/test-requirements.txt
fi
export SDHOST_TEST_PYTHON="$VENV/bin/python"

cargo test --workspace --all-targets "$@"
