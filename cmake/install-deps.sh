#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages toptheta needs to build, test and benchmark.
# Idempotent: checks each package with dpkg and touches apt only when one is missing
# (then runs apt-get update once and installs just the missing ones). Silent when all
# are present. Uses sudo only when not running as root.
#
#   cmake/install-deps.sh            # install what is missing
#   TOPTHETA_SKIP_DEPS=1 ...         # (in the run.sh scripts) skip this step entirely
set -euo pipefail

packages=(
  cmake make g++ clang libomp-dev     # toolchains (libomp-dev: OpenMP for clang)
  clang-format                        # the format check of .ci/run (.clang-format)
  libeigen3-dev                       # the library's one dependency
  catch2 libbenchmark-dev             # tests and benchmarks
  nlohmann-json3-dev                  # reference data in tests/examples
  libcli11-dev                        # the llama2c tools' command line
  python3 python3-matplotlib          # benchmarks/report: markdown table and PNG plot
  python3-dev pybind11-dev python3-numpy python3-pytest  # the Python module and its tests
  libopenmpi-dev openmpi-bin          # the sharded-decode example on MPI
)

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: not a Debian/Ubuntu system; install these by hand if the build fails:" >&2
  echo "  ${packages[*]}" >&2
  exit 0
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: need root or sudo to install: ${missing[*]}" >&2
    exit 1
  fi
  sudo=(sudo)
fi
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
