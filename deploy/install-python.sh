#!/usr/bin/env bash
# Build step of the serving images (as root): install CPython VERSION with its venv module from
# the distribution, or from the deadsnakes archive on Ubuntu releases that lack it (brst needs
# Python >= 3.10; the TorchServe base images carry an older one for TorchServe's own venv).
#   install-python.sh VERSION [--purge-build-tools [--java]]
# Without a flag (build stage) it also installs the headers that brst's C extension
# (handlers/stain/_remix.c) compiles against; --purge-build-tools (final stage) instead removes
# the compilers the base image ships. --java: the Java runtime TorchServe's frontend needs, unless
# the base has one (TorchServe's images do; a plain Debian base such as local/debian:bookworm-minbase not).
set -euo pipefail

version="${1:?usage: install-python.sh VERSION [--purge-build-tools [--java]]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update
if ! apt-cache show "python${version}-venv" > /dev/null 2>&1; then
    apt-get install -y --no-install-recommends software-properties-common gpg-agent
    add-apt-repository -y ppa:deadsnakes/ppa
    apt-get update
fi
apt-get install -y --no-install-recommends "python${version}" "python${version}-venv"
if [ "${3:-}" = "--java" ] && ! command -v java > /dev/null; then
    mkdir -p /usr/share/man/man1  # the JRE's postinst links its man pages there
    apt-get install -y --no-install-recommends openjdk-17-jre-headless
fi
if [ "${2:-}" = "--purge-build-tools" ]; then
    apt-get purge -y --auto-remove build-essential gcc g++ make
else
    apt-get install -y --no-install-recommends "python${version}-dev" gcc libc6-dev
fi
rm -rf /var/lib/apt/lists/*
