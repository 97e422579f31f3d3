# tierq image: the CLI, producer, worker and gateway. GPU workers use the CUDA vLLM build
# (extra `gpu`); build with --build-arg TIERQ_EXTRAS=cpu,embedded,gateway for a CPU-only image.
FROM python:3.11-slim
ARG TIERQ_EXTRAS=gpu,gateway
WORKDIR /app
COPY pyproject.toml README.md topics.yaml ./
COPY schemas ./schemas
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[${TIERQ_EXTRAS}]"
ENV TIERQ_TOPICS_FILE=/app/topics.yaml
ENTRYPOINT ["tierq"]
