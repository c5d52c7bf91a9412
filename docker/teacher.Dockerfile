# Teacher service on a CUDA GPU. TEACHER_BACKEND=vllm adds vLLM to the image.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ARG TEACHER_BACKEND=hf
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY configs ./configs
RUN python3 -m pip install --no-cache-dir --upgrade pip \
    && if [ "$TEACHER_BACKEND" = "vllm" ]; then python3 -m pip install --no-cache-dir ".[vllm]"; \
       else python3 -m pip install --no-cache-dir torchvision "."; fi
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
EXPOSE 8200
CMD ["gtr", "teacher", "serve", "--backend", "hf", "--model", "/models/base", "--store", "/checkpoints", \
     "--device", "cuda", "--host", "0.0.0.0", "--port", "8200"]
