# lepton-jax serve in a container: the package installed from this checkout,
# run by a non-root user, model directories read from a mounted volume.
#
#   docker build -t lepton-jax .
#   docker run -p 8000:8000 -v "$PWD/models:/models:ro" lepton-jax /models/digits /models/gpt
#
# GPU images: start from an NVIDIA CUDA base and install ".[gpu]" instead.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 lepton
WORKDIR /opt/lepton-jax
COPY pyproject.toml README.md ./
COPY lepton_jax ./lepton_jax
COPY recipes ./recipes
RUN pip install .

USER lepton
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"
ENTRYPOINT ["lepton-jax", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/models/model"]
