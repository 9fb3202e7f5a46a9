#!/bin/sh
# Debian tools the tests and benchmarks talk to: real clients no one here wrote
# (openssl, curl, dig, kdig) and the tools we compare against (nginx, dnsmasq).
set -eu
need=""
for pair in openssl:openssl curl:curl dig:bind9-dnsutils kdig:knot-dnsutils nginx:nginx-light dnsmasq:dnsmasq-base; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need="$need $pkg"
done
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages:$need"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "installing Debian packages:$need"
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
else
    echo "note: missing tools:$need — install them (e.g. apt-get install$need) for the tests that use them; those tests skip until then"
fi
