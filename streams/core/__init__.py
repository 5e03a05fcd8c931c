"""The pure core: sessions from events (``sessionize``), a partition's open sessions (``state``),
the pair rules (``pairing``, see ``docs/pair-rules.md``) and the rows a closed session makes
(``outputs``). Functions of their inputs only: no Faust, no Kafka, no files; may import
``prefstream.schemas`` and ``prefstream.errors``."""
