#!/usr/bin/env bash
# Test prerequisite (make test calls it): the servers the tests run for real that pip cannot
# install. Orthanc with its DICOMweb plugin and the WSI dicomizer (Debian packages orthanc,
# orthanc-dicomweb, orthanc-wsi) serve a converted HER2ST section over DICOMweb on loopback
# (tests/orthanc_fixtures.py). Installs only what is missing, so a second run does nothing;
# needs root (or sudo) and the Debian/Ubuntu archive. When it cannot install them it says so and
# exits 0: the DICOMweb tests then fail with the same clear message rather than skip.
set -euo pipefail

packages=(orthanc orthanc-dicomweb orthanc-wsi)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=(); elif command -v sudo > /dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n)
else
    echo "install-test-servers.sh: cannot install ${missing[*]} (not root, no sudo); the DICOMweb tests will fail" >&2
    exit 0
fi
if ! command -v apt-get > /dev/null; then
    echo "install-test-servers.sh: no apt-get; install ${missing[*]} by hand; the DICOMweb tests will fail" >&2
    exit 0
fi
echo "install-test-servers.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# the packages' postinst tries to start a system Orthanc on port 8042: the tests start their own
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" > /dev/null
    "${sudo[@]}" chmod +x "$policy"
    trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi
if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; }; then
    echo "install-test-servers.sh: apt-get could not install ${missing[*]}; the DICOMweb tests will fail" >&2
fi
exit 0
