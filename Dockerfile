FROM python:3.11-slim
# No .pyc writes (the root filesystem is read-only in Kubernetes), logs unbuffered.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY rotator ./rotator
# Exactly the versions requirements.lock pins, each file checked against its hash; then rotator,
# built by the setuptools the lock pins (no build isolation: nothing unpinned is fetched).
RUN pip install --no-cache-dir --require-hashes -r requirements.lock \
 && pip install --no-cache-dir --no-deps --no-build-isolation . \
 && groupadd --system --gid 10001 rotator \
 && useradd --system --uid 10001 --gid 10001 --create-home rotator \
 && install -d -m 0700 -o 10001 -g 10001 /home/rotator/.local /home/rotator/.local/state
# Numeric, so Kubernetes can check runAsNonRoot against the image itself.
USER 10001:10001
# Beat's schedule and a worker's outbox of critical alerts live in a private directory of this
# user (created 0700 on first use; compose mounts a volume here, owned by this user because the
# directory exists in the image); in Kubernetes XDG_STATE_HOME points at a volume of the pod.
ENV XDG_STATE_HOME=/home/rotator/.local/state
ENTRYPOINT ["rotator"]
