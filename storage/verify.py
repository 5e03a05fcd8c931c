"""Read a sealed partition and check it against its manifest row (``docs/storage-safety.md``).

The manifest's ``sha256`` is the hash of the partition's rows when it was sealed (or resealed
after late rows; ``storage.content_hash``), recomputed here in the scheme it names. A file
rewritten since (rows dropped, fields changed), rotted pages, or a file moved to quarantine
change the rows read now, hence the hash: the caller refuses such a partition. The rows are
hashed as they are read, so what is checked is what is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from prefstream.schemas.manifest import ManifestRow
from prefstream.storage.files import content_sha256, read_table
from prefstream.storage.tables import SEALED_TABLES


@dataclass(frozen=True)
class SealedContent:
    partition: str
    tables: dict[str, pa.Table]
    #: hash of the rows read now, in the scheme of ``expected`` (``storage.content_hash``); equal
    #: to it when the partition is intact
    sha256: str
    expected: str

    @property
    def intact(self) -> bool:
        return self.sha256 == self.expected


def read_sealed(data_dir: Path, row: ManifestRow) -> SealedContent:
    """Every sealed table of the manifest row's partition (damaged files skipped with a
    warning), with the hash of those rows and the manifest's."""
    partition = row.partition
    tables = {t: read_table(data_dir=data_dir, table=t, partitions=[partition])
              for t in SEALED_TABLES}
    return SealedContent(partition, tables, content_sha256(tables, like=row.sha256), row.sha256)
