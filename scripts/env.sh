# Source me: exports what the eBPF build needs (written by scripts/install-deps.sh).
_cw_env="${CAUSEWAY_ENV_FILE:-${CARGO_HOME:-$HOME/.cargo}/causeway-ebpf.env}"
if [ -f "$_cw_env" ]; then
    # shellcheck disable=SC1090
    . "$_cw_env"
else
    echo "causeway: $_cw_env missing; run scripts/install-deps.sh first" >&2
fi
unset _cw_env
