"""One small exception tree: catch ``PrefstreamError`` for anything the product raises."""


class PrefstreamError(Exception):
    """Base of every error prefstream raises on purpose."""


class ConfigError(PrefstreamError):
    """A setting is missing or inconsistent."""


class BrokerError(PrefstreamError):
    """The Kafka broker could not be started or reached."""


class ProducerError(PrefstreamError):
    """An event could not be handed to the broker within the configured bound."""


class StorageError(PrefstreamError):
    """The data dir is unusable (missing, locked, corrupt)."""
