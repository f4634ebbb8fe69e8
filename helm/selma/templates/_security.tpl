{{/*
Transport security and authentication of the selma services (issue 17): the names, environment,
volumes and probes that tls.*, certManager.*, auth.* and models.* turn into. The services read:
  server  SELMA_TLS_CERT_FILE, SELMA_TLS_KEY_FILE, SELMA_TLS_CLIENT_CA_FILE (mutual TLS),
          SELMA_ALLOW_PLAINTEXT, SELMA_AUTH_TOKENS_FILE, SELMA_AUTH_JWKS_FILE, SELMA_AUTH_JWT_ISSUER,
          SELMA_AUTH_JWT_AUDIENCE, SELMA_AUTH_OPEN_HEALTH, SELMA_MODEL_ALLOWED_DIRS, SELMA_MODEL_ALLOWED_BUCKETS
  client  SELMA_TOKEN, SELMA_TLS_CA, SELMA_TLS_CLIENT_CERT, SELMA_TLS_CLIENT_KEY
  launcher SELMA_BATCH_TOKEN_SECRET, SELMA_BATCH_TLS_SECRET (what worker Jobs mount)
Secrets are mounted as whole volumes (no subPath), so a renewed certificate reaches the files.
*/}}

{{- define "selma.tlsMountPath" -}}/etc/selma/tls{{- end }}
{{- define "selma.scriptsMountPath" -}}/etc/selma/scripts{{- end }}

{{/* The kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt): the user's, or the one cert-manager writes. */}}
{{- define "selma.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "selma.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* The services' own token (key `token`) and its tokens file (key `tokens.yaml`). */}}
{{- define "selma.authSecretName" -}}
{{- default (printf "%s-auth" (include "selma.fullname" .)) .Values.auth.internal.existingSecret }}
{{- end }}

{{/* The name the generated internal token has in logs and metrics. */}}
{{- define "selma.internalTokenName" -}}
{{- printf "%s-internal" (include "selma.fullname" .) }}
{{- end }}

{{/* Every selma Service name a client may dial, in the forms in-cluster DNS resolves: the certificate's dnsNames. */}}
{{- define "selma.serviceDnsNames" -}}
{{- $names := list }}
{{- range $component, $served := include "selma.servedServices" . | fromYaml }}
{{- $svc := include "selma.componentName" (dict "root" $ "component" $component) }}
{{- $ns := $.Release.Namespace }}
{{- $names = concat $names (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.certManager.clusterDomain)) }}
{{- end }}
{{- if and .Values.serving.enabled .Values.serving.routing.enabled }}
{{- $svc := include "selma.servingReplicasName" . }}
{{- $ns := .Release.Namespace }}
{{- $names = concat $names (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.certManager.clusterDomain)) }}
{{- end }}
{{- toJson (concat $names .Values.certManager.extraDnsNames | uniq) }}
{{- end }}

{{/* "true" when probes must run grpc-health.py (native gRPC probes speak neither TLS nor tokens). */}}
{{- define "selma.execProbes" -}}
{{- if or .Values.tls.enabled (and .Values.auth.enabled (not .Values.auth.openHealth)) }}true{{ end }}
{{- end }}

{{/* Invalid tls/auth combinations, as a JSON list of messages for selma.validateValues. */}}
{{- define "selma.securityErrors" -}}
{{- $errors := list }}
{{- $tls := .Values.tls }}
{{- if and $tls.enabled (not $tls.existingSecret) (not .Values.certManager.enabled) }}
{{- $errors = append $errors "tls.enabled is true (the default) but no certificate is configured: set tls.existingSecret to a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt, or set certManager.enabled=true (and certManager.issuerRef.name) to have cert-manager issue one; tls.enabled=false serves plaintext" }}
{{- end }}
{{- if and $tls.enabled $tls.existingSecret .Values.certManager.enabled }}
{{- $errors = append $errors "tls.existingSecret and certManager.enabled are exclusive: the certificate comes from your Secret or from cert-manager" }}
{{- end }}
{{- if and .Values.certManager.enabled (not .Values.certManager.issuerRef.name) }}
{{- $errors = append $errors "certManager.issuerRef.name is required with certManager.enabled: the Issuer or ClusterIssuer that signs selma's certificate" }}
{{- end }}
{{- if and .Values.certManager.enabled (not $tls.enabled) }}
{{- $errors = append $errors "certManager.enabled needs tls.enabled=true (the certificate would be unused)" }}
{{- end }}
{{- if and $tls.mutual (not $tls.enabled) }}
{{- $errors = append $errors "tls.mutual needs tls.enabled=true" }}
{{- end }}
{{- $jwt := .Values.auth.jwt }}
{{- if and $jwt.existingSecret (or (not $jwt.issuer) (not $jwt.audience)) }}
{{- $errors = append $errors "auth.jwt.existingSecret needs auth.jwt.issuer and auth.jwt.audience: tokens are accepted only from that issuer for that audience" }}
{{- end }}
{{- toJson $errors }}
{{- end }}

{{/* What a client in a selma pod needs: the CA to verify servers, its certificate for mutual TLS, the internal token. */}}
{{- define "selma.clientEnv" -}}
{{- $dir := include "selma.tlsMountPath" . }}
{{- if .Values.tls.enabled }}
- name: SELMA_TLS_CA
  value: {{ printf "%s/ca.crt" $dir }}
{{- if .Values.tls.mutual }}
- name: SELMA_TLS_CLIENT_CERT
  value: {{ printf "%s/tls.crt" $dir }}
- name: SELMA_TLS_CLIENT_KEY
  value: {{ printf "%s/tls.key" $dir }}
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: SELMA_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "selma.authSecretName" . }}
      key: token
{{- end }}
{{- end }}

{{/* Environment of a service Deployment; pass (dict "root" $ "component" "training"). */}}
{{- define "selma.securityEnv" -}}
{{- $v := .root.Values }}
{{- $dir := include "selma.tlsMountPath" .root }}
{{- if $v.tls.enabled }}
- name: SELMA_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" $dir }}
- name: SELMA_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" $dir }}
{{- if $v.tls.mutual }}
- name: SELMA_TLS_CLIENT_CA_FILE
  value: {{ printf "%s/ca.crt" $dir }}
{{- end }}
{{- else }}
- name: SELMA_ALLOW_PLAINTEXT
  value: "true"
{{- end }}
{{- include "selma.clientEnv" .root }}
{{- if $v.auth.enabled }}
{{- $files := list "/etc/selma/auth/internal/tokens.yaml" }}
{{- if $v.auth.existingSecret }}
{{- $files = append $files "/etc/selma/auth/users/tokens.yaml" }}
{{- end }}
- name: SELMA_AUTH_TOKENS_FILE
  value: {{ join "," $files | quote }}
- name: SELMA_AUTH_OPEN_HEALTH
  value: {{ $v.auth.openHealth | toString | quote }}
{{- if $v.auth.jwt.existingSecret }}
- name: SELMA_AUTH_JWKS_FILE
  value: /etc/selma/auth/jwt/jwks.json
- name: SELMA_AUTH_JWT_ISSUER
  value: {{ $v.auth.jwt.issuer | quote }}
- name: SELMA_AUTH_JWT_AUDIENCE
  value: {{ $v.auth.jwt.audience | quote }}
{{- end }}
{{- end }}
{{- if has .component (list "training" "evaluation") }}
{{- /* what the launcher mounts into the worker Jobs it creates */}}
{{- if $v.tls.enabled }}
- name: SELMA_BATCH_TLS_SECRET
  value: {{ include "selma.tlsSecretName" .root | quote }}
{{- end }}
{{- if $v.auth.enabled }}
- name: SELMA_BATCH_TOKEN_SECRET
  value: {{ include "selma.authSecretName" .root | quote }}
{{- end }}
{{- end }}
- name: SELMA_MODEL_ALLOWED_DIRS
  value: {{ join "," $v.models.allowedDirs | quote }}
- name: SELMA_MODEL_ALLOWED_BUCKETS
  value: {{ join "," $v.models.allowedBuckets | quote }}
{{- end }}

{{/* Volumes of a service Deployment (pass the root): the certificate, the tokens files, the probe script. */}}
{{- define "selma.securityVolumes" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "selma.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth-internal
  secret:
    secretName: {{ include "selma.authSecretName" . }}
    defaultMode: 0440
    # the digest only: the token itself reaches the container as SELMA_TOKEN
    items:
      - key: tokens.yaml
        path: tokens.yaml
{{- with .Values.auth.existingSecret }}
- name: auth-users
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: tokens.yaml
        path: tokens.yaml
{{- end }}
{{- with .Values.auth.jwt.existingSecret }}
- name: auth-jwks
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: {{ $.Values.auth.jwt.jwksKey }}
        path: jwks.json
{{- end }}
{{- end }}
{{- if eq (include "selma.execProbes" .) "true" }}
- name: scripts
  configMap:
    name: {{ include "selma.fullname" . }}-probes
{{- end }}
{{- end }}

{{- define "selma.securityVolumeMounts" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "selma.tlsMountPath" . }}
  readOnly: true
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth-internal
  mountPath: /etc/selma/auth/internal
  readOnly: true
{{- if .Values.auth.existingSecret }}
- name: auth-users
  mountPath: /etc/selma/auth/users
  readOnly: true
{{- end }}
{{- if .Values.auth.jwt.existingSecret }}
- name: auth-jwks
  mountPath: /etc/selma/auth/jwt
  readOnly: true
{{- end }}
{{- end }}
{{- if eq (include "selma.execProbes" .) "true" }}
- name: scripts
  mountPath: {{ include "selma.scriptsMountPath" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The action of a probe: native gRPC health, or grpc-health.py once against the pod's own port
over TLS (verified as the Service's name, which the certificate carries) with the pod's client
env. Pass (dict "root" $ "component" "render" "service" "selma.v1.RenderService"). */}}
{{- define "selma.probeAction" -}}
{{- $port := .root.Values.ports.grpc }}
{{- if eq (include "selma.execProbes" .root) "true" }}
exec:
  command:
    - python
    - {{ printf "%s/grpc-health.py" (include "selma.scriptsMountPath" .root) }}
    - --wait=0
    {{- if .root.Values.tls.enabled }}
    - --server-name={{ include "selma.componentName" (dict "root" .root "component" .component) }}
    {{- end }}
    - {{ printf "127.0.0.1:%v=%s" $port .service | quote }}
{{- else }}
grpc:
  port: {{ $port }}
  service: {{ .service | quote }}
{{- end }}
{{- end }}
