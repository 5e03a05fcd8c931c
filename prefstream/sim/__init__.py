"""Synthetic traffic and the demo harness: the traffic simulator (``traffic``, which mixes the
sessions of ``users`` acting as ``behaviours`` on ``texts`` or a ``content`` file into one
stream, as a ``workload`` asks) and ``prefstream demo``'s end-to-end run (``demo``: embedded
broker, worker, producer, trainer). Sits above the worker, the trainer and the read-only commands
(``status``), which it drives."""
