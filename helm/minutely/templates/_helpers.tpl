{{/* Names ---------------------------------------------------------------------------------------------- */}}
{{- define "minutely.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "minutely.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<role>", kept within 63 characters. Call with (dict "ctx" $ "role" "worker"). */}}
{{- define "minutely.roleName" -}}
{{- printf "%s-%s" (include "minutely.fullname" .ctx | trunc 55 | trimSuffix "-") .role -}}
{{- end -}}

{{- define "minutely.serviceAccountName" -}}
{{- if .ctx.Values.serviceAccount.create -}}
{{- include "minutely.roleName" . -}}
{{- else -}}
{{- default "default" .ctx.Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels --------------------------------------------------------------------------------------------- */}}
{{- define "minutely.selectorLabels" -}}
app.kubernetes.io/name: {{ include "minutely.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "minutely.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "minutely.selectorLabels" . }}
app.kubernetes.io/part-of: minutely
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Image: by digest when one is given (immutable), else by tag (default: appVersion). */}}
{{- define "minutely.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* METRICS_BROKER_URL in Faust's form: kafka://h1:9092;kafka://h2:9092 */}}
{{- define "minutely.brokerUrl" -}}
{{- $urls := list -}}
{{- range .Values.kafka.brokers -}}
{{- $urls = append $urls (printf "kafka://%s" .) -}}
{{- end -}}
{{- join ";" $urls -}}
{{- end -}}

{{/* Checks that cut across values (the schema checks each value alone). */}}
{{- define "minutely.validate" -}}
{{- if gt (int .Values.worker.replicas) (int .Values.kafka.partitions) -}}
{{- fail (printf "worker.replicas (%d) is larger than kafka.partitions (%d): the extra workers would get no partition. Lower worker.replicas, or install with more partitions under a new kafka.appId (partitions cannot be raised in place)." (int .Values.worker.replicas) (int .Values.kafka.partitions)) -}}
{{- end -}}
{{- if eq (int .Values.config.adminPort) (int .Values.config.webPort) -}}
{{- fail (printf "config.adminPort (%d) equals config.webPort: the operator's endpoints must not share the tenants' port (the ingress would reach them). Pick another adminPort." (int .Values.config.adminPort)) -}}
{{- end -}}
{{- range $k, $v := .Values.config.extra -}}
{{- if not (regexMatch "^METRICS_[A-Z0-9_]+$" $k) -}}
{{- fail (printf "config.extra key %q is not a METRICS_<NAME> setting: use the names in app/settings.py (METRICS_ + field name in upper case)" $k) -}}
{{- end -}}
{{- /* Secrets by name. METRICS_LIMIT_INFLIGHT_BYTES_PER_TOKEN (a limit per token) is not one. */}}
{{- if and (regexMatch "_(PASSWORD|TOKEN|SECRET|KEY)$" $k) (not (regexMatch "_PER_TOKEN$" $k)) -}}
{{- fail (printf "config.extra key %q names a secret (it ends in _PASSWORD, _TOKEN, _SECRET or _KEY), and config.extra goes into a ConfigMap that anyone who can read the namespace's ConfigMaps can read. Put the value in a Secret and reference it instead: credentials.secretEnv: [{name: %s, secretName: <secret>, key: <key in the secret>}]" $k $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The pod template shared by all roles. Call with (dict "ctx" $ "role" "web" "spec" .Values.web). */}}
{{- define "minutely.podTemplate" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $spec := .spec -}}
{{- $port := int $v.config.webPort -}}
{{- $adminPort := int $v.config.adminPort -}}
metadata:
  labels:
    {{- include "minutely.labels" . | nindent 4 }}
    {{- with $spec.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $ctx.Template.BasePath "/configmap.yaml") $ctx | sha256sum }}
    {{- if $v.metrics.podAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ $adminPort | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with $spec.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "minutely.serviceAccountName" . }}
  # Workload identity (IRSA, GKE) does not need the API token; nothing here talks to the Kubernetes API.
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $spec.terminationGracePeriodSeconds }}
  {{- with $spec.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- if and (eq .role "worker") $v.kafka.ensureTopics }}
  initContainers:
    - name: ensure-topics
      image: {{ include "minutely.image" $ctx }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command: ["python", "-m", "app.ops", "ensure-topics"]
      {{- include "minutely.envFrom" . | nindent 6 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      resources:
        requests: {cpu: 50m, memory: 128Mi}
        limits: {cpu: 500m, memory: 256Mi}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        {{- if $v.credentials.awsSecret }}
        - {name: aws-credentials, mountPath: /var/run/secrets/minutely/aws, readOnly: true}
        {{- end }}
  {{- end }}
  containers:
    - name: {{ .role }}
      image: {{ include "minutely.image" $ctx }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        {{- if eq .role "writer" }}
        {{- toYaml (list "writer" "--store" $spec.store "--quiet" "-l" "info") | nindent 8 }}
        {{- else }}
        {{- toYaml $spec.args | nindent 8 }}
        {{- end }}
      {{- include "minutely.envFrom" . | nindent 6 }}
      # http: the tenants' port, the one in the Service. admin: the operator's (probes, Prometheus), in no
      # Service. The writer serves no tenant: its only port is the admin one.
      ports:
        {{- if ne .role "writer" }}
        - name: http
          containerPort: {{ $port }}
          protocol: TCP
        {{- end }}
        - name: admin
          containerPort: {{ $adminPort }}
          protocol: TCP
      startupProbe:
        httpGet: {path: /healthz, port: admin}
        {{- toYaml $spec.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet: {path: /healthz, port: admin}
        {{- toYaml $spec.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet: {path: /readyz, port: admin}
        {{- toYaml $spec.probes.readiness | nindent 8 }}
      resources:
        {{- toYaml $spec.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - {name: data, mountPath: /var/lib/minutely}
        - {name: tmp, mountPath: /tmp}
        # Per-app limit overrides (limits.overrides), re-read when the kubelet updates the file: no restart.
        - {name: limits, mountPath: /etc/minutely/limits, readOnly: true}
        {{- if $v.credentials.awsSecret }}
        - {name: aws-credentials, mountPath: /var/run/secrets/minutely/aws, readOnly: true}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {sizeLimit: 256Mi}
    - name: limits
      configMap:
        name: {{ include "minutely.fullname" $ctx }}-limits
    {{- if ne .role "worker" }}
    - name: data
      emptyDir: {sizeLimit: 256Mi}
    {{- end }}
    {{- if $v.credentials.awsSecret }}
    - name: aws-credentials
      secret:
        secretName: {{ $v.credentials.awsSecret }}
        defaultMode: 0440
        items:
          - {key: credentials, path: credentials}
    {{- end }}
  {{- with $spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Settings from the ConfigMap, secrets by reference, role-specific env. */}}
{{- define "minutely.envFrom" -}}
{{- $v := .ctx.Values -}}
envFrom:
  - configMapRef:
      name: {{ include "minutely.fullname" .ctx }}
{{- if or $v.credentials.awsSecret $v.credentials.secretEnv .spec.env (eq .role "worker") }}
env:
  {{- if eq .role "worker" }}
  {{- /* Each worker's stable address (headless Service): other workers forward policy reads for the apps
         it owns to it (app/api/policies.py); Faust advertises it as the worker's canonical URL. */}}
  - name: POD_NAME
    valueFrom:
      fieldRef: {fieldPath: metadata.name}
  - name: METRICS_ADVERTISED_URL
    value: {{ printf "http://$(POD_NAME).%s.%s.svc:%d" (include "minutely.roleName" (dict "ctx" .ctx "role" "worker")) .ctx.Release.Namespace (int $v.config.webPort) | quote }}
  {{- /* Reads are forwarded (with the client's token) only to hosts in the headless Service's domain. */}}
  - name: METRICS_FORWARD_ALLOWED_SUFFIX
    value: {{ printf "%s.%s.svc" (include "minutely.roleName" (dict "ctx" .ctx "role" "worker")) .ctx.Release.Namespace | quote }}
  {{- end }}
  {{- if $v.credentials.awsSecret }}
  - name: AWS_SHARED_CREDENTIALS_FILE
    value: /var/run/secrets/minutely/aws/credentials
  {{- end }}
  {{- range $v.credentials.secretEnv }}
  - name: {{ .name }}
    valueFrom:
      secretKeyRef:
        name: {{ .secretName }}
        key: {{ .key }}
  {{- end }}
  {{- with .spec.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}
