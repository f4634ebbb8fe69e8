"""TrainingService (selma.v1.TrainingService): LoRA skill experts trained in Kubernetes Jobs or local processes."""
