# uv wherever it is: on PATH, pip's --user bin, or as a module (sourced by geomoe.sh and scripts/check_wheel.sh).
uv_cmd() {
  if command -v uv >/dev/null 2>&1; then uv "$@"
  elif [ -x "$HOME/.local/bin/uv" ]; then "$HOME/.local/bin/uv" "$@"
  else python3 -m uv "$@"
  fi
}
