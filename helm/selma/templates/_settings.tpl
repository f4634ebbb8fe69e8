{{/*
Settings (SELMA_* environment variables) the chart sets. Names follow shared/selma/config.py and
services/<name>/settings.py; credentials never appear here (they come from Secrets).
*/}}

{{- define "selma.commonSettings" -}}
SELMA_HOST: "0.0.0.0"
SELMA_GRPC_PORT: {{ .Values.ports.grpc | quote }}
SELMA_METRICS_PORT: {{ .Values.ports.metrics | quote }}
SELMA_LOG_LEVEL: {{ .Values.config.logLevel | quote }}
SELMA_LOG_FORMAT: {{ .Values.config.logFormat | quote }}
SELMA_DEVICE: {{ .Values.config.device | quote }}
SELMA_PRECISION: {{ .Values.config.precision | quote }}
SELMA_HF_OFFLINE: {{ .Values.config.hfOffline | quote }}
SELMA_DRAIN_SECONDS: {{ .Values.config.drainSeconds | quote }}
SELMA_MAX_MESSAGE_BYTES: {{ .Values.config.maxMessageBytes | int64 | quote }}
SELMA_DATA_DIR: "/var/lib/selma"
SELMA_STORAGE_URI: {{ .Values.storage.uri | quote }}
SELMA_S3_ENDPOINT: {{ include "selma.s3Endpoint" . | quote }}
SELMA_S3_SECURE: {{ ternary "false" (.Values.storage.s3.secure | toString) .Values.minio.enabled | quote }}
SELMA_S3_REGION: {{ .Values.storage.s3.region | quote }}
{{- /* The hook Job creates buckets; services need no bucket-creation rights. */}}
SELMA_S3_CREATE_BUCKETS: {{ ternary "false" "true" .Values.storage.bucketJob.enabled | quote }}
{{- if .Values.modelCache.enabled }}
SELMA_MODEL_CACHE_DIR: {{ .Values.modelCache.mountPath | quote }}
{{- end }}
{{- range $k, $v := .Values.config.extra }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end }}

{{- /* The LLM layer (selma.llm.settings.LlmSettings): the prompt service, and evaluation for its questions. */}}
{{- define "selma.llmSettings" -}}
{{- if .Values.llm.baseUrl }}
SELMA_LLM_DEFAULT_BACKEND: "openai_compatible"
SELMA_LLM_OPENAI_BASE_URL: {{ .Values.llm.baseUrl | quote }}
{{- with .Values.llm.model }}
SELMA_LLM_OPENAI_MODEL: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.llm.allowedBaseUrls }}
SELMA_LLM_ALLOWED_BASE_URLS: {{ toJson . | quote }}
{{- end }}
{{- end }}

{{- define "selma.promptsSettings" -}}
{{- if .Values.llm.secrets }}
SELMA_LLM_SECRETS_DIR: "/var/run/secrets/selma"
{{- end }}
{{ include "selma.llmSettings" . }}
{{- end }}

{{- /* The RenderService; with render.workers.max > 0 it launches shard workers (`selma render shard`) like training does. */}}
{{- define "selma.renderSettings" -}}
SELMA_RENDER_DEFAULT_MODEL: {{ .Values.model.base | quote }}
SELMA_RENDER_SHARDS: {{ .Values.render.workers.default | quote }}
SELMA_RENDER_MAX_SHARDS: {{ .Values.render.workers.max | quote }}
{{- if gt (int .Values.render.workers.max) 0 }}
{{ include "selma.batchSettings" . }}
{{- end }}
{{- end }}

{{- /* The batch platform (selma.batch.settings.BatchSettings): how the training service and the
evaluation service launch their workers (`selma train`, `selma eval execute`) from training.jobs. */}}
{{- define "selma.batchSettings" -}}
{{- $j := .Values.training.jobs }}
SELMA_BATCH_LAUNCHER: {{ $j.launcher | quote }}
SELMA_BATCH_NAMESPACE: {{ .Release.Namespace | quote }}
SELMA_BATCH_IMAGE: {{ include "selma.image" . | quote }}
SELMA_BATCH_IMAGE_PULL_POLICY: {{ .Values.image.pullPolicy | quote }}
SELMA_BATCH_SERVICE_ACCOUNT: {{ include "selma.trainerServiceAccountName" . | quote }}
{{- /* app.kubernetes.io/instance of trainer pods: this release's NetworkPolicy selects them by it. */}}
SELMA_BATCH_INSTANCE: {{ .Release.Name | quote }}
{{- /* trainer pods serve selma_trainer_* on the same port as the services (PodMonitor, NetworkPolicy) */}}
SELMA_BATCH_METRICS_PORT: {{ .Values.ports.metrics | quote }}
SELMA_BATCH_STORAGE_SECRET: {{ include "selma.storageSecretName" . | quote }}
SELMA_BATCH_STORAGE_SECRET_ACCESS_KEY_KEY: {{ .Values.storage.credentials.accessKeyKey | quote }}
SELMA_BATCH_STORAGE_SECRET_SECRET_KEY_KEY: {{ .Values.storage.credentials.secretKeyKey | quote }}
{{- if .Values.modelCache.enabled }}
SELMA_BATCH_MODEL_CACHE_PVC: {{ default (printf "%s-model-cache" (include "selma.fullname" .)) .Values.modelCache.existingClaim | quote }}
{{- end }}
SELMA_BATCH_CPU_REQUEST: {{ $j.cpuRequest | quote }}
SELMA_BATCH_MEMORY_REQUEST: {{ $j.memoryRequest | quote }}
SELMA_BATCH_MEMORY_LIMIT: {{ $j.memoryLimit | quote }}
SELMA_BATCH_SHM_SIZE: {{ $j.shmSize | quote }}
SELMA_BATCH_BACKOFF_LIMIT: {{ $j.backoffLimit | quote }}
SELMA_BATCH_ACTIVE_DEADLINE_SECONDS: {{ $j.activeDeadlineSeconds | quote }}
SELMA_BATCH_TTL_SECONDS_AFTER_FINISHED: {{ $j.ttlSecondsAfterFinished | quote }}
{{ include "selma.placementPolicySettings" . }}
{{- end }}

{{- /* The operator's placement policy of worker Jobs (placementPolicy → SELMA_BATCH_POLICY_*; lists and maps as JSON). */}}
{{- define "selma.placementPolicySettings" -}}
{{- $p := .Values.placementPolicy }}
SELMA_BATCH_POLICY_PRIORITY_CLASSES: {{ $p.priorityClasses | default list | toJson | quote }}
SELMA_BATCH_POLICY_TOLERATIONS: {{ $p.tolerations | default list | toJson | quote }}
SELMA_BATCH_POLICY_NODE_SELECTORS: {{ $p.nodeSelectors | default dict | toJson | quote }}
SELMA_BATCH_POLICY_RUNTIME_CLASSES: {{ $p.runtimeClasses | default list | toJson | quote }}
SELMA_BATCH_POLICY_ALLOW_AFFINITY: {{ $p.allowAffinity | toString | quote }}
{{- with $p.gpuResourceNames }}
SELMA_BATCH_POLICY_GPU_RESOURCE_NAMES: {{ . | toJson | quote }}
{{- end }}
SELMA_BATCH_POLICY_MAX_GPUS: {{ $p.maxGpus | quote }}
SELMA_BATCH_POLICY_MAX_NODES: {{ $p.maxNodes | default 1 | quote }}
SELMA_BATCH_POLICY_MAX_CPU: {{ $p.maxCpu | quote }}
SELMA_BATCH_POLICY_MAX_MEMORY: {{ $p.maxMemory | quote }}
SELMA_BATCH_POLICY_MAX_ACTIVE_DEADLINE_SECONDS: {{ $p.maxActiveDeadlineSeconds | int64 | quote }}
SELMA_BATCH_POLICY_DEFAULT_QUEUE: {{ $p.defaultQueue | quote }}
{{- end }}

{{- /* The EvaluationService's own (selma_evaluation.settings.EvaluationSettings): evaluations render
through ServingService and answer with a VQA model in worker Jobs (trainer-style, selma.dev/task=eval). */}}
{{- define "selma.evalSettings" -}}
{{- if .Values.serving.enabled }}
SELMA_EVAL_SERVING_ENDPOINT: {{ include "selma.servingEndpoint" . | quote }}
{{- end }}
SELMA_EVAL_VQA_MODEL: {{ .Values.evaluation.vqaModel | quote }}
SELMA_EVAL_VQA_BATCH_SIZE: {{ .Values.evaluation.vqaBatchSize | quote }}
{{- with .Values.evaluation.vqaAllowedBaseUrls }}
SELMA_EVAL_ALLOWED_BASE_URLS: {{ toJson . | quote }}
{{- end }}
SELMA_EVAL_MAX_CONCURRENT_JOBS: {{ .Values.evaluation.maxConcurrentJobs | int | quote }}
{{- /* questions for new prompts are written by the same LLM the prompt service uses (llm.*) */}}
{{ include "selma.llmSettings" . }}
{{- end }}

{{- /* `selma serve training`: the TrainingService, and the EvaluationService beside it unless evaluation.separate. */}}
{{- define "selma.trainingSettings" -}}
SELMA_TRAINING_DEFAULT_MODEL: {{ .Values.model.base | quote }}
{{- /* admission: trainer Jobs launched at once; the others wait in order (selma.jobs.JobManager) */}}
SELMA_TRAINING_MAX_CONCURRENT_JOBS: {{ .Values.training.jobs.maxConcurrent | int | quote }}
{{ include "selma.batchSettings" . }}
{{- if not .Values.evaluation.separate }}
{{ include "selma.evalSettings" . }}
{{- end }}
{{- end }}

{{- /* `selma serve evaluation` (evaluation.separate): the same launcher settings as training, plus its own. */}}
{{- define "selma.evaluationSettings" -}}
{{ include "selma.batchSettings" . }}
{{ include "selma.evalSettings" . }}
{{- end }}

{{- define "selma.servingSettings" -}}
SELMA_SERVING_BASE_MODEL: {{ .Values.model.base | quote }}
SELMA_SERVING_GC_GRACE_SECONDS: {{ .Values.gc.gracePeriodSeconds | int64 | quote }}
{{- end }}
