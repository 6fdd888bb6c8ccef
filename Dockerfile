# One small container: runtime dependencies only, run as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000

WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt && useradd --create-home --uid 10001 switchboard
COPY --chown=switchboard . ./
USER switchboard
EXPOSE 8000
CMD ["/bin/sh", "-c", "exec uvicorn --factory main:create_app --host 0.0.0.0 --port $PORT --no-proxy-headers --no-access-log --timeout-graceful-shutdown 20 --ws websockets-sansio --ws-per-message-deflate false"]
