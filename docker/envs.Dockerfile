# Env service: CPU only. The alfworld extra builds jericho and fast-downward from source.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY configs ./configs
# CPU torch (the env service never runs a model, but the package depends on torch).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" \
    && pip install --no-cache-dir ".[alfworld]"
ENV PYTHONUNBUFFERED=1
EXPOSE 8100
CMD ["gtr", "env", "serve", "--host", "0.0.0.0", "--port", "8100"]
