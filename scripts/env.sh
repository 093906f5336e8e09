# shellcheck shell=bash
# env.sh: `source scripts/env.sh` exports what `cargo build --release --workspace` needs:
# torch-sys finds libtorch inside the torch venv that scripts/setup.sh installs
# ($FLEET_TORCH_VENV, default /opt/fleet/torch-venv). fleet-train is linked with a run path into
# that venv, so running it needs no environment of its own.
FLEET_TORCH_VENV=${FLEET_TORCH_VENV:-/opt/fleet/torch-venv}
if [ ! -x "$FLEET_TORCH_VENV/bin/python" ]; then
  echo "env.sh: no torch venv at $FLEET_TORCH_VENV (run scripts/setup.sh)" >&2
  return 1 2>/dev/null || exit 1
fi
export FLEET_TORCH_VENV
export VIRTUAL_ENV=$FLEET_TORCH_VENV
export LIBTORCH_USE_PYTORCH=1
case ":$PATH:" in
  *":$FLEET_TORCH_VENV/bin:"*) ;;
  *) export PATH="$FLEET_TORCH_VENV/bin:$PATH" ;;
esac
