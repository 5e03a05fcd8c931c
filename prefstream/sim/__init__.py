"""Synthetic traffic and the demo harness: the traffic simulator (``traffic``, ``content``) and
``prefstream demo``'s end-to-end run (``demo``: embedded broker, worker, producer, trainer). Sits
above the worker, the trainer and the read-only commands (``status``), which it drives."""
