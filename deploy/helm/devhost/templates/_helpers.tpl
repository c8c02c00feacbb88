{{/* The chart's name, at most 63 characters. */}}
{{- define "devhost.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name, used for every object. */}}
{{- define "devhost.fullname" -}}
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

{{- define "devhost.selectorLabels" -}}
app.kubernetes.io/name: {{ include "devhost.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "devhost.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "devhost.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: device-plugin
{{- end }}

{{- define "devhost.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "devhost.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
devhost.toml. Keep this block to plain Values substitutions piped
through `quote` or `int`: tests/e2e/deploy.rs renders it with a small
stand-in for Helm that knows only those, and feeds the result to devhost's
own config parser.
*/}}
{{- define "devhost.hostConfig" -}}
# Host settings, rendered from the chart's values (README, "Configuration").
plugin_dir = {{ .Values.pluginDir | quote }}
backends_dir = "backends.d"
call_timeout_ms = {{ .Values.callTimeoutMs | int }}
metrics_address = "0.0.0.0:{{ .Values.metrics.port | int }}"

[log]
format = {{ .Values.log.format | quote }}
level = {{ .Values.log.level | quote }}
{{- end }}
