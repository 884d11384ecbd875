# The Loopcast image: the `loopcast` CLI and every Python process (worker, console, jobs driver).
# Kafka, Redis, ClickHouse and Spark run as their own containers (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install . \
 && useradd --create-home --uid 10001 loopcast

USER loopcast
ENV LOOPCAST_HOME=/home/loopcast/.cache/loopcast \
    LOOPCAST_HOST=0.0.0.0
EXPOSE 18800
CMD ["loopcast", "--help"]
