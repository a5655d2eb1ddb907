# Sourced by scripts/setup.sh and scripts/cluster.sh: install the Debian packages whose commands are
# missing. Usage: apt_install_missing COMMAND:PACKAGE ...
apt_install_missing() {
  local wanted=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || wanted+=("${pair##*:}")
  done
  ((${#wanted[@]})) || return 0
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${wanted[@]}"
}
