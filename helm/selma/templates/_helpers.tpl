{{/*
Names, labels and shared pod parts of the selma chart.
*/}}

{{- define "selma.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or just <release> when it already contains the chart name. */}}
{{- define "selma.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "selma.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; pass (dict "root" $ "component" "render"). */}}
{{- define "selma.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selma.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* Common labels; pass (dict "root" $ "component" "render"). */}}
{{- define "selma.labels" -}}
helm.sh/chart: {{ include "selma.chart" .root }}
{{ include "selma.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: selma
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The service Deployments this release runs: component name -> fully-qualified gRPC service (its
readiness probe target), enabled ones only. The EvaluationService is hosted by the training
Deployment (`selma serve training`) unless evaluation.separate gives it its own (`selma serve evaluation`).
*/}}
{{- define "selma.services" -}}
{{- if .Values.prompts.enabled }}
prompts: selma.v1.PromptService
{{- end }}
{{- if .Values.render.enabled }}
render: selma.v1.RenderService
{{- end }}
{{- if .Values.training.enabled }}
training: selma.v1.TrainingService
{{- end }}
{{- if .Values.serving.enabled }}
serving: selma.v1.ServingService
{{- end }}
{{- if .Values.evaluation.separate }}
evaluation: selma.v1.EvaluationService
{{- end }}
{{- end }}

{{/* Every gRPC service each Deployment answers for (its own first): component -> list. */}}
{{- define "selma.servedServices" -}}
{{- range $component, $grpcService := include "selma.services" . | fromYaml }}
{{ $component }}: [{{ $grpcService }}{{ if and (eq $component "training") (not $.Values.evaluation.separate) }}, selma.v1.EvaluationService{{ end }}]
{{- end }}
{{- end }}

{{/* The arguments of a service's container: `serve <component>`, and `--only` for a training
service whose EvaluationService runs in its own Deployment. Pass (dict "root" $ "component" "training"). */}}
{{- define "selma.serveArgs" -}}
{{- $args := list "serve" .component }}
{{- if and (eq .component "training") .root.Values.evaluation.separate }}
{{- $args = append $args "--only" }}
{{- end }}
{{- toJson $args }}
{{- end }}

{{/* "true" when a component launches worker Jobs through the Kubernetes API (training, and a
separate evaluation service): it runs under the launcher ServiceAccount bound to the Role in
rbac.yaml. Pass (dict "root" $ "component" "training"). */}}
{{- define "selma.launchesJobs" -}}
{{- $render := and (eq .component "render") (gt (int .root.Values.render.workers.max) 0) }}
{{- if and (or (has .component (list "training" "evaluation")) $render) (eq .root.Values.training.jobs.launcher "kubernetes") }}true{{ end }}
{{- end }}

{{/* "true" when some Deployment of this release launches Kubernetes Jobs (the launcher account and Role are needed). */}}
{{- define "selma.kubernetesLauncher" -}}
{{- $render := and .Values.render.enabled (gt (int .Values.render.workers.max) 0) }}
{{- if and (or .Values.training.enabled .Values.evaluation.separate $render) (eq .Values.training.jobs.launcher "kubernetes") }}true{{ end }}
{{- end }}

{{- define "selma.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "selma.componentName" -}}
{{- printf "%s-%s" (include "selma.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* ServiceAccounts: the services (no API access), the Job launcher (its Role: the training service and a
separate evaluation service), trainer and evaluation worker Jobs (no API access). */}}
{{- define "selma.serviceAccountName" -}}
{{- include "selma.fullname" . }}
{{- end }}
{{- define "selma.trainingServiceAccountName" -}}
{{- printf "%s-training" (include "selma.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "selma.trainerServiceAccountName" -}}
{{- printf "%s-trainer" (include "selma.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "selma.storageSecretName" -}}
{{- default (printf "%s-storage" (include "selma.fullname" .)) .Values.storage.credentials.existingSecret }}
{{- end }}

{{- define "selma.minioHost" -}}
{{- printf "%s-minio" (include "selma.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The S3 endpoint the pods use: the bundled MinIO's Service, or the external one. */}}
{{- define "selma.s3Endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "http://%s:%d" (include "selma.minioHost" .) (int .Values.minio.port) }}
{{- else }}
{{- .Values.storage.s3.endpoint }}
{{- end }}
{{- end }}

{{/* The bucket of storage.uri (s3://bucket/prefix). */}}
{{- define "selma.bucket" -}}
{{- regexReplaceAll "^s3://([^/]+).*$" .Values.storage.uri "${1}" }}
{{- end }}

{{/* Invalid combinations the schema cannot express: collected, then one `fail`. */}}
{{- define "selma.validateValues" -}}
{{- $errors := list }}
{{- if and (not .Values.minio.enabled) (not .Values.storage.s3.endpoint) }}
{{- $errors = append $errors "storage.s3.endpoint is required when minio.enabled is false (or set minio.enabled=true for a trial cluster)" }}
{{- end }}
{{- if and (not .Values.minio.enabled) (not .Values.storage.credentials.existingSecret) }}
{{- $errors = append $errors "storage.credentials.existingSecret is required for an external S3 endpoint: create a Secret with the keys and name it here (a generated Secret is only for the bundled MinIO)" }}
{{- end }}
{{- if and .Values.serving.autoscaling.enabled (lt (int .Values.serving.autoscaling.maxReplicas) (int .Values.serving.autoscaling.minReplicas)) }}
{{- $errors = append $errors "serving.autoscaling.maxReplicas must be >= serving.autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.serving.autoscaling.enabled (eq (int .Values.serving.autoscaling.targetCPUUtilizationPercentage) 0) (not .Values.serving.autoscaling.queueDepth.enabled) (not .Values.serving.autoscaling.metrics) }}
{{- $errors = append $errors "serving.autoscaling needs targetCPUUtilizationPercentage > 0, queueDepth.enabled or at least one entry in serving.autoscaling.metrics" }}
{{- end }}
{{- if and (eq .Values.training.jobs.launcher "kubernetes") (not .Values.training.rbac.create) (not .Values.serviceAccount.create) }}
{{- $errors = append $errors "training.jobs.launcher=kubernetes needs the training ServiceAccount and its Role: keep serviceAccount.create and training.rbac.create true" }}
{{- end }}
{{- if gt (int .Values.render.workers.default) (int .Values.render.workers.max) }}
{{- $errors = append $errors "render.workers.default must be <= render.workers.max (a render cannot default to more shard workers than a request may ask for)" }}
{{- end }}
{{- if and (gt (int .Values.render.workers.max) 0) (ne .Values.training.jobs.launcher "kubernetes") }}
{{- $errors = append $errors "render.workers.max > 0 runs shard workers as Kubernetes Jobs: set training.jobs.launcher=kubernetes (local workers would share the render pod's GPU)" }}
{{- end }}
{{- if and (eq .Values.ports.grpc .Values.ports.metrics) }}
{{- $errors = append $errors "ports.grpc and ports.metrics must differ" }}
{{- end }}
{{- $errors = concat $errors (include "selma.securityErrors" . | fromJsonArray) }}
{{- if $errors }}
{{- fail (printf "\n\nselma: invalid values:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}

{{/* Environment shared by services, trainer Jobs and hooks: ConfigMap + credentials from Secrets. */}}
{{- define "selma.env" -}}
- name: SELMA_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "selma.storageSecretName" . }}
      key: {{ .Values.storage.credentials.accessKeyKey }}
- name: SELMA_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "selma.storageSecretName" . }}
      key: {{ .Values.storage.credentials.secretKeyKey }}
{{- end }}

{{/* Volumes every selma pod mounts: writable scratch (the root filesystem is read-only), model cache, /dev/shm. */}}
{{- define "selma.volumes" -}}
- name: tmp
  emptyDir: {}
- name: data
  emptyDir: {}
{{- if .root.Values.modelCache.enabled }}
- name: model-cache
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-model-cache" (include "selma.fullname" .root)) .root.Values.modelCache.existingClaim }}
{{- end }}
{{- if .shmSize }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- end }}
{{- end }}

{{- define "selma.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/selma
{{- if .root.Values.modelCache.enabled }}
- name: model-cache
  mountPath: {{ .root.Values.modelCache.mountPath }}
{{- end }}
{{- if .shmSize }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/* GPU resources: nvidia.com/gpu in both requests and limits (extended resources must match). */}}
{{- define "selma.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (int .gpu) 0 }}
{{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpu)) (default dict $res.limits)) }}
{{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .gpu)) (default dict $res.requests)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* The headless Service over the serving pods (serving.routing). */}}
{{- define "selma.servingReplicasName" -}}
{{- printf "%s-replicas" (include "selma.componentName" (dict "root" . "component" "serving")) }}
{{- end }}

{{/* Where in-cluster clients reach ServingService: every pod through the headless Service (routed by
model/mix, re-resolved) with serving.routing, else the normal Service. */}}
{{- define "selma.servingEndpoint" -}}
{{- if .Values.serving.routing.enabled }}
{{- printf "dns:///%s:%v" (include "selma.servingReplicasName" .) .Values.ports.grpc }}
{{- else }}
{{- printf "%s:%v" (include "selma.componentName" (dict "root" . "component" "serving")) .Values.ports.grpc }}
{{- end }}
{{- end }}
