#!/usr/bin/env bash
# test.sh: the one test command. Installs what is missing (scripts/setup.sh), checks formatting,
# clippy (warnings are errors) and shellcheck, brings up a test bed of three OpenSSH hosts of its
# own, runs every test, and always takes the test bed down again.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test it exec:: runs one topic).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# The lint gates: formatting, every shell script (the remote ones are run by sh on hosts), and
# function length; clippy follows once libtorch is found.
cargo fmt --all --check
find scripts crates -name '*.sh' -print0 | xargs -0 shellcheck -S warning
# No function outside tests longer than a screen (90 lines).
find crates -name '*.rs' -not -path '*/tests/*' -print0 | xargs -0 python3 scripts/long_fns.py 90 --check

# A test bed separate from the demo's (scripts/testbed.sh defaults), so both can be up at once.
export TB_DIR=/tmp/fleet-testbed-tests TB_NS_PREFIX=ft- TB_BRIDGE=ftbr0 TB_SUBNET=10.213.1

scripts/testbed.sh down 2>/dev/null || true
trap 'scripts/testbed.sh down' EXIT
scripts/testbed.sh up netns

# The whole workspace: fleet-train builds against the venv's libtorch.
source scripts/env.sh
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace "$@"
