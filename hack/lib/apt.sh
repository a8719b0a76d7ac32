# Sourced by the hack/ scripts that need Debian packages (hack/docker.sh,
# hack/kind-tools.sh): installs what is missing, from the distribution only.

# apt_install <who> <package...>: installs the packages (`apt-get update` once
# per call, then `apt-get install`); as non-root, says what to install and fails.
apt_install() {
  local who="$1"; shift
  local pkgs=("$@")
  [[ ${#pkgs[@]} -gt 0 ]] || return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "$who: missing ${pkgs[*]}; install them (apt-get install ${pkgs[*]}) or run as root" >&2
    exit 1
  fi
  echo "$who: installing ${pkgs[*]} (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}
