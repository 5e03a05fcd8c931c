"""A sealed partition's manifest row: what storage writes when it seals a partition
(``manifest/<partition>[.v<N>].parquet``, one row; each reseal adds a version), and what the
trainer and ``prefstream status`` read to know which data is final (``sealed_partitions``)."""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

#: the tables a seal covers, each counted in the row as ``n_<table>``
SEALED_TABLES = ("pairs", "ties", "unpaired", "refusals", "sessions")


class ManifestRow(BaseModel):
    """One sealed event-time partition: its bounds, its files and the hash of its rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partition: str = Field(description="Event-time partition name, ``YYYY-MM-DDTHH``.")
    start: AwareDatetime
    end: AwareDatetime = Field(description="Exclusive: ``start`` plus ``partition_hours``.")
    sealed_at: AwareDatetime = Field(description="When it was sealed (kept by a compaction).")
    watermark: AwareDatetime = Field(description="The lowest watermark that sealed it.")
    files: tuple[str, ...] = Field(description="Its live files, relative to the data dir.")
    n_pairs: int = Field(ge=0)
    n_ties: int = Field(ge=0)
    n_unpaired: int = Field(ge=0)
    n_refusals: int = Field(ge=0)
    n_sessions: int = Field(ge=0)
    sha256: str = Field(description="Hash of its rows, naming its scheme: ``cols1:<64 hex>``, or "
                        "``<64 hex>`` as written before (``storage.content_hash``).")

    def n_rows(self, table: str) -> int:
        """Rows of ``table`` (one of :data:`SEALED_TABLES`) in the partition."""
        if table not in SEALED_TABLES:
            raise KeyError(f"{table!r} is not a sealed table ({', '.join(SEALED_TABLES)})")
        return int(getattr(self, f"n_{table}"))
