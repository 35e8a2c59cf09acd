FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY rotator ./rotator
RUN pip install --no-cache-dir . && useradd --system --uid 10001 rotator
USER rotator
ENTRYPOINT ["rotator"]
