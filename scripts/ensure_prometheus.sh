#!/usr/bin/env bash
# The Prometheus integration test needs a real Prometheus server binary. Install Debian's package when it is
# missing and we may (root + apt); otherwise say why, and the test skips with that reason.
command -v prometheus >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[prometheus] installing Debian package 'prometheus' for the metrics integration test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
    >/tmp/hcml-apt-prometheus.log 2>&1 || echo "[prometheus] install failed (see /tmp/hcml-apt-prometheus.log): the test will skip"
else
  echo "[prometheus] not installed and cannot install (not root or no apt-get): the test will skip"
fi
exit 0
