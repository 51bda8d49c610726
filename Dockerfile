# sapretrain on GPU nodes: the pinned environment of requirements.txt + constraints.txt and the
# package installed from its wheel (not editable), on the Python the lock was made with.
#   docker build -t sapretrain .
#   docker run --gpus all --ipc=host -v /data:/data -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY sapretrain \
#       accelerate launch --config_file launch/accelerate/8gpu.yaml -m sapretrain.cli.train \
#       --config configs/paper.yaml data.shards=/data/shards run.output_dir=/data/runs/paper
#   docker run sapretrain sapretrain --help          # every command: sapretrain-curate, -shards, -evaluate ...
# torch comes from the lock (torch==2.14.1, the CUDA 13.0 build on PyPI, CUDA libraries as nvidia-*
# wheels; the host only needs the driver), so the image trains with the versions the tests ran on.
# configs/... paths resolve inside the installed package from any directory.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.14.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1

# OpenCV (pulled in by ultralytics, the ROI detector) needs these at import time.
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# The lock first: its layer is reused while only the code changes.
COPY requirements.txt constraints.txt /tmp/lock/
RUN pip install -c /tmp/lock/constraints.txt -r /tmp/lock/requirements.txt \
    && python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '${TORCH_VERSION}' else f'torch {v} is not the pinned ${TORCH_VERSION}')"

# The package from a wheel built out of a copy that is deleted afterwards: nothing imports the source.
COPY setup.cfg pyproject.toml README.md /tmp/src/
COPY sapretrain /tmp/src/sapretrain
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src && pip check  # the lock already holds every extra

WORKDIR /workspace
COPY launch/accelerate ./launch/accelerate
COPY docs ./docs

CMD ["accelerate", "launch", "--config_file", "launch/accelerate/1gpu.yaml", "-m", "sapretrain.cli.train", "--config", "configs/paper.yaml"]
