# The runtime's image: the package and its examples, installed when the image is built, run by
# a user of its own. `docker compose up --build` builds it; or alone:
#   docker build -t durable-actors .
#   docker run --rm -e ACTORS_REDIS_URL=redis://HOST:6379/0 durable-actors worker examples.counter:app
# The image has no embedded server: give it a Redis URL (ACTORS_REDIS_URL, or --redis).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin actors

WORKDIR /app
COPY pyproject.toml README.md ./
COPY actors ./actors
RUN pip install .
# Apps are imported from the working directory (actors worker examples.counter:app).
COPY examples ./examples

USER actors
ENTRYPOINT ["actors"]
CMD ["worker", "examples.counter:app"]
