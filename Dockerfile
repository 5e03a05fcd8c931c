# The image of the worker and trainer services (docker-compose.yml): the project, CPU-only torch,
# entry point the `prefstream` console script. Build: docker build -t prefstream .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# CPU-only torch first, so installing the project finds torch satisfied and never pulls the
# CUDA wheels (GB of layers); a GPU image would install torch from its CUDA index here instead.
RUN pip install torch --index-url https://download.pytorch.org/whl/cpu

# Only what the package needs: the folders of pyproject's [tool.setuptools.package-dir].
COPY pyproject.toml README.md ./
COPY prefstream ./prefstream
COPY streams ./streams
COPY schemas ./schemas
COPY storage ./storage
COPY trainer ./trainer
RUN pip install .

# An unprivileged user owning /data: a named volume mounted there starts with this owner.
RUN useradd --create-home --uid 1000 prefstream && mkdir /data && chown prefstream /data
USER prefstream
ENV PREFSTREAM_DATA_DIR=/data

ENTRYPOINT ["prefstream"]
CMD ["--help"]
