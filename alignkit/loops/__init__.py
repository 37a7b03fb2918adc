"""Small explicit training loops, one file each, built from the same pieces (see ``common`` and ``config``).

Each loop module has a config dataclass (composed from :mod:`alignkit.loops.config` blocks) and a ``train_*``
function; the CLI runs them as ``alignkit <name>``. Import a loop from its module (``alignkit.loops.sft``).
"""
