"""TrainingService (selma.v1.TrainingService): LoRA skill experts trained in Kubernetes Jobs or local processes.

Modules, in the order data flows:

* ``config``      presets (sd1, sd2, sdxl, tiny) + overrides → a validated ``TrainingConfig``;
                  the ``TrainingJob`` document stored as a training_config artifact.
* ``data``        the image_dataset, PIL/numpy transforms, the latent/text-embedding cache.
* ``trainer``     ``train(job, settings)``: LoRA training, checkpoints, expert export.
* ``checkpoint``  safetensors + JSON checkpoints with corrupt-checkpoint fallback.
* ``cli``         ``selma train --config URI``: the entrypoint of Jobs and local subprocesses.
* ``core``        validate → store the job document → launch through :mod:`selma.batch` → follow (no gRPC).
* ``server``      gRPC glue; ``metrics`` and ``settings`` beside it.
"""
