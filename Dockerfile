# The lab's one image: every service of docker-compose.yml runs it, its command picks the
# role. BASE: any Debian-family image with Python >= 3.11 and venv (python:3.12-slim, or
# the local one `make compose-test` makes with debootstrap). Pure Python plus wheels that
# exist for amd64 and arm64. Nothing private is in it: the CA, its keys and the control
# plane's token are made at run time by the init service, in volumes.
ARG BASE=python:3.12-slim

# A throwaway stage: the venv is built here, and only the venv leaves it. A wheelhouse in
# build/wheels (made on the building machine with its own pip settings, see the Makefile)
# is used alone, offline; without one, pip uses its defaults.
FROM ${BASE} AS build
COPY pyproject.toml build/wheel[s] /wheels/
COPY pyproject.toml README.md /src/
COPY lab /src/lab
COPY scenarios /src/scenarios
RUN python3 -m venv /opt/sni-lab \
 && if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; fi \
 && /opt/sni-lab/bin/pip install --no-cache-dir --disable-pip-version-check "$@" /src

FROM ${BASE}
# curl and dig for the client toolbox, ip for the edge's addresses, the system trust store.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl bind9-dnsutils iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/sni-lab /opt/sni-lab
COPY scripts/compose-entrypoint.sh /usr/local/bin/sni-lab-entrypoint
RUN useradd --create-home --uid 10001 --user-group lab \
 && mkdir -p /lab/certs /lab/secret /lab/trust /lab/state \
 && chown lab:lab /lab/certs /lab/secret /lab/trust /lab/state \
 && chmod 0700 /lab/certs /lab/secret /lab/state \
 && ln -s /lab/state /home/lab/.lab
ENV PATH=/opt/sni-lab/bin:$PATH PYTHONUNBUFFERED=1
USER lab
WORKDIR /home/lab
ENTRYPOINT ["sni-lab-entrypoint"]
CMD ["sni-lab", "--help"]
