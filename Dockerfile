# sapretrain on GPU nodes: an official PyTorch CUDA runtime image + this package.
#   docker build -t sapretrain .
#   docker run --gpus all --ipc=host -v /data:/data -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY sapretrain \
#       accelerate launch --config_file launch/accelerate/8gpu.yaml launch/pretrain.py \
#       --config configs/paper.yaml data.shards=/data/shards run.output_dir=/data/runs/paper
# The image keeps its own CUDA build of torch; everything else comes from setup.cfg.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /opt/sapretrain

# OpenCV (pulled in by ultralytics, the ROI detector) needs these at import time.
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
COPY setup.cfg pyproject.toml README.md ./
COPY sapretrain ./sapretrain
RUN pip install -e ".[s3,eval,curation]"
COPY tools ./tools
COPY launch ./launch
COPY configs ./configs
COPY docs ./docs

CMD ["accelerate", "launch", "--config_file", "launch/accelerate/1gpu.yaml", "launch/pretrain.py", "--config", "configs/paper.yaml"]
