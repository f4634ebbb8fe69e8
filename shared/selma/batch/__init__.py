"""The batch platform: where workers run (local subprocesses, Kubernetes Jobs) for every service that launches them.

``launchers`` (the interface, the local launcher, the registry of live launches), ``kube`` (the pure Job
builder and the Kubernetes launcher), ``progress`` (the progress document a worker writes and its service
reads), ``worker`` (what every worker process does the same way), ``settings`` (``SELMA_BATCH_*``) and
``metrics``.
"""
