"""The Faust stream worker: wiring (``app``, ``run``), the flush/commit pipeline (``pipeline``:
rows, then changelog, then offsets), rebalance and consumer handling (``consumer``,
``offsetguard``), topics, signed watermark ticks and log hygiene. May import the core, storage,
the Kafka clients of ``prefstream.streams`` and the base (settings, errors, schemas)."""
