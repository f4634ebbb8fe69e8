"""selma: SELMA (skill-specific LoRA experts on auto-generated data, merged) as gRPC services.

This package is the shared core every service imports: settings, errors, storage,
artifacts with lineage, the gRPC server bootstrap, metrics and the offline tiny models.
The generated API stubs live in ``selma.v1`` (built from ``protos/`` at install time).
"""

__version__ = "0.1.0"
