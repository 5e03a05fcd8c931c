FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# CPU-only torch keeps the image small; GPU hosts can swap the index URL.
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY prefstream ./prefstream
COPY streams ./streams
COPY schemas ./schemas
COPY storage ./storage
COPY trainer ./trainer
RUN pip install --no-cache-dir .
RUN useradd --create-home prefstream && mkdir /data && chown prefstream /data
USER prefstream
ENTRYPOINT ["prefstream"]
