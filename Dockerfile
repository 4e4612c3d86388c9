# The TAFE image: `tafe up` (Debian's Nginx in front of TAFE's workers) as an unprivileged
# user. Used by deploy/k8s/deployment.yaml; settings come from TAFE_CONFIG / TAFE_* there.
#   docker build -t tafe:0.1.0 .
FROM python:3.11-slim

# nginx: the public listener `tafe up` runs (Debian's package, run unprivileged with its own prefix).
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent tafe

# gcc and libc6-dev build the profiler's C extension at `pip install` and leave in the same layer.
COPY . /src
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir /src \
    && apt-get purge -y gcc libc6-dev \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* /src

USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["tafe"]
CMD ["up", "--host", "0.0.0.0", "--admin-host", "0.0.0.0"]
