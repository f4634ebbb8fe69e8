{{/*
selma's alerting rules as Prometheus rule groups. The PrometheusRule wraps them; the script
helm/scripts/generate.py writes the same groups to manifests/prometheus/selma-alerts.yaml, which
`promtool check rules` and `promtool test rules` (helm/selma/files/alerts-test.yaml) exercise in CI.
Every metric is one the services export (checked against a live scrape in CI).
Selectors pin the release's namespace and Service names, as set by the ServiceMonitor. Trainer
pods expose no metrics: training alerts use the training service's selma_training_* series.
*/}}
{{- define "selma.alertGroups" -}}
{{- $r := .Values.monitoring.prometheusRule }}
{{- $ns := .Release.Namespace }}
{{- $full := include "selma.fullname" . }}
{{- $labels := merge (dict) $r.additionalLabels }}
{{- $services := list }}
{{- range $component, $grpcService := include "selma.services" . | fromYaml }}
{{- $services = append $services $component }}
{{- end }}
{{- $jobs := printf "%s-(%s)" $full (join "|" $services) }}
- name: selma.services
  rules:
    - alert: SelmaServiceDown
      expr: sum by (namespace, job) (up{namespace="{{ $ns }}", job=~"{{ $jobs }}"}) == 0
      for: {{ $r.serviceDownFor }}
      labels:
        severity: critical
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "selma {{`{{ $labels.job }}`}} is down"
        description: "No {{`{{ $labels.job }}`}} pod in {{`{{ $labels.namespace }}`}} has answered a metrics scrape for {{ $r.serviceDownFor }}: check the pods (kubectl describe, logs) and their GPU nodes."
    {{- range $services }}
    - alert: SelmaServiceAbsent
      expr: absent(up{namespace="{{ $ns }}", job="{{ $full }}-{{ . }}"} == 1)
      for: {{ $r.serviceDownFor }}
      labels:
        severity: critical
        namespace: {{ $ns }}
        job: {{ $full }}-{{ . }}
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "selma {{ . }} has no running target"
        description: "Prometheus has no up target for {{ $full }}-{{ . }} in {{ $ns }} for {{ $r.serviceDownFor }}: the Deployment has no ready pod, or monitoring does not select it."
    {{- end }}
    - alert: SelmaServiceNotReady
      expr: max by (namespace, service) (selma_service_ready{namespace="{{ $ns }}"}) == 0
      for: {{ $r.serviceDownFor }}
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "selma {{`{{ $labels.service }}`}} is up but not SERVING"
        description: "{{`{{ $labels.service }}`}} has reported NOT_SERVING for {{ $r.serviceDownFor }} (model not loaded, or draining): see its log for the load error."
    - alert: SelmaHighErrorRate
      expr: |
        sum by (namespace, grpc_service) (rate(selma_grpc_server_handled_total{namespace="{{ $ns }}", grpc_code=~"INTERNAL|UNKNOWN|UNAVAILABLE|DATA_LOSS|DEADLINE_EXCEEDED"}[5m]))
          / sum by (namespace, grpc_service) (rate(selma_grpc_server_handled_total{namespace="{{ $ns }}"}[5m]))
          > {{ $r.errorRatio }}
      for: 10m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{`{{ $labels.grpc_service }}`}} fails {{`{{ $value | humanizePercentage }}`}} of RPCs"
        description: "More than {{ $r.errorRatio }} of {{`{{ $labels.grpc_service }}`}} RPCs ended with a server-side error code over 10 minutes (storage or model backends down?)."
- name: selma.jobs
  rules:
    - alert: SelmaJobFailed
      # Training has its own alert with the launcher's outcome (SelmaTrainingJobFailed).
      expr: sum by (namespace, kind) (increase(selma_jobs_finished_total{namespace="{{ $ns }}", phase="FAILED", kind!="expert_training"}[15m])) > 0
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "a selma {{`{{ $labels.kind }}`}} job failed"
        description: "{{`{{ $value | humanize }}`}} {{`{{ $labels.kind }}`}} job(s) failed in the last 15 minutes: `selma status` or the job's Get RPC gives the reason."
- name: selma.storage
  rules:
    # selma_storage_errors_total counts storage calls that failed after the client's retries
    # (NOT_FOUND is an answer, not a failure). Transient codes warn once they persist;
    # PERMISSION_DENIED never heals by itself (wrong keys or bucket policy), so it pages.
    - alert: SelmaStorageErrors
      expr: sum by (namespace, job, backend, code) (rate(selma_storage_errors_total{namespace="{{ $ns }}", code!="PERMISSION_DENIED"}[5m])) > 0
      for: {{ $r.storageErrorsFor }}
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{`{{ $labels.job }}`}} storage calls fail with {{`{{ $labels.code }}`}} ({{`{{ $labels.backend }}`}})"
        description: "{{`{{ $labels.job }}`}} has had {{`{{ $labels.backend }}`}} storage calls failing with {{`{{ $labels.code }}`}} after retries for {{ $r.storageErrorsFor }}: UNAVAILABLE means the S3/MinIO endpoint is down or unreachable (SELMA_S3_ENDPOINT, NetworkPolicy egress), RESOURCE_EXHAUSTED a full disk or quota."
    - alert: SelmaStoragePermissionDenied
      expr: sum by (namespace, job, backend) (rate(selma_storage_errors_total{namespace="{{ $ns }}", code="PERMISSION_DENIED"}[5m])) > 0
      for: 2m
      labels:
        severity: critical
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{`{{ $labels.job }}`}} is denied access to its {{`{{ $labels.backend }}`}} storage"
        description: "{{`{{ $labels.job }}`}} gets PERMISSION_DENIED from {{`{{ $labels.backend }}`}} storage: this does not heal by retrying. Check the storage credentials Secret (storage.credentials) and the bucket policy; for file storage, the volume's owner (fsGroup)."
{{- if .Values.prompts.enabled }}
- name: selma.prompts
  rules:
    - alert: SelmaPromptsLLMErrors
      expr: |
        sum by (namespace, backend) (rate(selma_prompts_llm_requests_total{namespace="{{ $ns }}", outcome="error"}[10m]))
          / sum by (namespace, backend) (rate(selma_prompts_llm_requests_total{namespace="{{ $ns }}"}[10m]))
          > 0.2
      for: 10m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "{{`{{ $value | humanizePercentage }}`}} of {{`{{ $labels.backend }}`}} LLM requests fail"
        description: "Prompt generation's LLM backend {{`{{ $labels.backend }}`}} fails after retries (selma_prompts_llm_errors_total has the error classes): check the endpoint, its API key Secret and rate limits."
{{- end }}
{{- if .Values.training.enabled }}
- name: selma.training
  rules:
    - alert: SelmaTrainingJobFailed
      expr: sum by (namespace, launcher) (increase(selma_batch_outcomes_total{namespace="{{ $ns }}", outcome="failed"}[15m])) > 0
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "a selma expert training failed ({{`{{ $labels.launcher }}`}} launcher)"
        description: "{{`{{ $value | humanize }}`}} trainer(s) failed in the last 15 minutes: GetExpertTraining gives the reason; kubectl -n {{ $ns }} get jobs -l app.kubernetes.io/component=trainer shows the Jobs."
    - alert: SelmaTrainingStalled
      expr: |
        # The value is the step it is stuck at: step < max steps, no change in the window, jobs running.
        selma_training_step{namespace="{{ $ns }}"} < selma_training_max_steps{namespace="{{ $ns }}"}
        and changes(selma_training_step{namespace="{{ $ns }}"}[{{ $r.trainingStalledMinutes }}m]) == 0
        and on (namespace) (sum by (namespace) (selma_jobs_active{namespace="{{ $ns }}", kind="expert_training"}) > 0)
      for: 1m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "selma training of {{`{{ $labels.skill }}`}} is stalled at step {{`{{ $value }}`}}"
        description: "The {{`{{ $labels.skill }}`}} expert made no optimizer step for {{ $r.trainingStalledMinutes }} minutes while training jobs are running: a pending pod (no GPU, Kueue quota), a hung data loader, or a trainer that lost storage."
    - alert: SelmaTrainingKubernetesApiErrors
      expr: sum by (namespace, verb, code) (increase(selma_batch_kubernetes_api_errors_total{namespace="{{ $ns }}"}[10m])) > 0
      for: 5m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "the {{ if .Values.evaluation.separate }}training or evaluation{{ else }}training{{ end }} service's Kubernetes {{`{{ $labels.verb }}`}} calls fail ({{`{{ $labels.code }}`}})"
        description: "403 means the Role in the chart (training.rbac.create) is missing or edited; 'unreachable' means the API server cannot be reached (NetworkPolicy egress to 443/6443)."
{{- end }}
{{- if .Values.render.enabled }}
- name: selma.render
  rules:
    - alert: SelmaRenderSlow
      expr: |
        histogram_quantile(0.95, sum by (namespace, le) (rate(selma_render_image_seconds_bucket{namespace="{{ $ns }}", source="dataset"}[15m])))
          > {{ $r.renderImageP95Seconds }}
      for: 15m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "selma render takes {{`{{ $value | humanizeDuration }}`}} per image (p95)"
        description: "p95 render time per dataset image has been above {{ $r.renderImageP95Seconds }}s for 15 minutes: a GPU-less pod (SELMA_DEVICE), too many steps, or out-of-memory retries (selma_render_oom_retries_total)."
{{- end }}
{{- if .Values.serving.enabled }}
- name: selma.serving
  rules:
    - alert: SelmaServingLatencyHigh
      expr: |
        histogram_quantile(0.95, sum by (namespace, le) (rate(selma_serving_request_seconds_bucket{namespace="{{ $ns }}"}[5m])))
          > {{ $r.servingRequestP95Seconds }}
      for: 10m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "selma Generate p95 latency is {{`{{ $value | humanizeDuration }}`}}"
        description: "p95 Generate latency (arrival to last image) has been above {{ $r.servingRequestP95Seconds }}s for 10 minutes: scale serving out (HPA maxReplicas) or lower steps/resolution."
    - alert: SelmaServingRejecting
      expr: sum by (namespace) (increase(selma_serving_rejected_requests_total{namespace="{{ $ns }}"}[10m])) > 0
      for: 5m
      labels:
        severity: warning
        {{- with $labels }}{{ toYaml . | nindent 8 }}{{ end }}
      annotations:
        summary: "selma serving refuses requests: its queue is full"
        description: "{{`{{ $value | humanize }}`}} Generate requests were refused with RESOURCE_EXHAUSTED in 10 minutes: add replicas or raise SELMA_SERVING_MAX_QUEUE."
{{- end }}
{{- end }}
