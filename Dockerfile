# sapretrain on GPU nodes. The pinned torch wheel brings its own CUDA libraries; the host needs
# an NVIDIA driver recent enough for them and the NVIDIA container toolkit (`docker run --gpus all`).
#   docker build -t sapretrain .
#   docker run --gpus all -v /data:/data sapretrain \
#       accelerate launch launch/pretrain.py --config configs/paper.yaml data.shards=/data/shards
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/sapretrain

COPY requirements.txt constraints.txt setup.cfg pyproject.toml README.md ./
RUN pip install -r requirements.txt -c constraints.txt

COPY sapretrain ./sapretrain
RUN pip install --no-deps --no-build-isolation -e .
COPY tools ./tools
COPY launch ./launch
COPY configs ./configs
COPY docs ./docs

CMD ["accelerate", "launch", "launch/pretrain.py", "--config", "configs/paper.yaml"]
