#!/usr/bin/env bash
# Debian packages the tests run for real: redis-server, an RTSP server (gst-rtsp-server), promtool,
# and a headless Chromium with its driver for the console's browser tests.
set -euo pipefail
packages=(redis-server python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base
          gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly
          gstreamer1.0-libav prometheus chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian prometheus package starts a server on :9090 at install; tests start their own.
$sudo systemctl stop prometheus 2>/dev/null || $sudo service prometheus stop 2>/dev/null || true
