FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY rotator ./rotator
RUN pip install --no-cache-dir . && useradd --system --uid 10001 --create-home rotator
USER rotator
# Beat's schedule lives in a private directory of this user (created 0700 on first use).
ENV XDG_STATE_HOME=/home/rotator/.local/state
ENTRYPOINT ["rotator"]
