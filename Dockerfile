# One image for gateway and workers; the command picks the role.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service service
COPY workers workers
COPY models models
COPY history history
RUN pip install --no-cache-dir .
ENV ADVERSA_VAR_DIR=/var/lib/adversa
EXPOSE 8000
CMD ["adversa", "serve", "--host", "0.0.0.0", "--workers", "0"]
