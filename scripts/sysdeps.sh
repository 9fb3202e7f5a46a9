#!/bin/sh
# Debian tools the tests and benchmarks talk to: real clients no one here wrote
# (openssl, curl, dig, kdig), the tools we compare against and run the catalog on (nginx,
# Caddy, HAProxy, dnsmasq), load generators (wrk, dnsperf, h2load), and a real browser for what a person looks at: Debian's
# chromium, driven by Playwright, trusting the lab CA through an NSS database (certutil).
# Each is optional: what cannot be installed is skipped by the tests that need it, with a reason.
set -u
need=""
for pair in openssl:openssl curl:curl dig:bind9-dnsutils kdig:knot-dnsutils "nginx:nginx-light|nginx" \
            dnsmasq:dnsmasq-base wrk:wrk dnsperf:dnsperf chromium:chromium certutil:libnss3-tools \
            caddy:caddy haproxy:haproxy h2load:nghttp2-client; do
    cmd=${pair%%:*}; pkgs=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need="$need $pkgs"
done
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
else
    echo "note: missing tools ($need); install them with apt-get for the tests that use them; those tests skip until then"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "note: no apt-get; missing:$need"; exit 0; }
echo "installing Debian packages:$need"
$sudo apt-get update -qq >/dev/null 2>&1
for alternatives in $need; do
    ok=""
    for pkg in $(echo "$alternatives" | tr '|' ' '); do
        if $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1; then
            ok=1; break
        fi
    done
    [ -n "$ok" ] || echo "note: could not install $alternatives; the tests that need it will skip"
done
exit 0
