# Trainer on a CUDA GPU: LoRA-PPO with transformers + peft.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY configs ./configs
RUN python3 -m pip install --no-cache-dir --upgrade pip \
    && python3 -m pip install --no-cache-dir torchvision "."
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
EXPOSE 8300
CMD ["gtr", "train", "--config", "configs/points24-kl.yaml"]
