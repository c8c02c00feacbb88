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

{{/* The image: no default, because none is published. */}}
{{- define "devhost.image" -}}
{{- $repository := required "image.repository is required: no devhost image is published. Build deploy/Dockerfile, push it where your nodes pull from, and set image.repository (e.g. --set image.repository=registry.example.com/devhost); see docs/operator-guide.md, \"Build the image\"" .Values.image.repository -}}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end }}

{{/*
The kubelet's root directory: the parent of pluginDir, as devhost's
[dra] kubelet_root defaults to.
*/}}
{{- define "devhost.kubeletRoot" -}}
{{- dir (.Values.pluginDir | trimSuffix "/") -}}
{{- end }}

{{- define "devhost.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "devhost.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
devhost.toml. tests/e2e/deploy.rs renders the chart with Helm and feeds
the result to devhost's own config parser.
*/}}
{{- define "devhost.hostConfig" -}}
# Host settings, rendered from the chart's values (README, "Configuration").
plugin_dir = {{ .Values.pluginDir | quote }}
backends_dir = "backends.d"
call_timeout_ms = {{ .Values.callTimeoutMs | int }}
metrics_address = "0.0.0.0:{{ .Values.metrics.port | int }}"
# /healthz and /readyz alone, on the pod's loopback: the exec probes
# (`devhost probe live|ready`) ask here, out of reach of the clients of the
# metrics port.
probe_address = "127.0.0.1:9478"
# The CDI spec directories the container runtime reads, lowest priority
# first (containerd's and CRI-O's default; devhost's default too), written
# out because the DaemonSet mounts each at the host's path: /etc/cdi read
# only, /var/run/cdi (cdi_dir, where devhost writes its own specs)
# read-write. devhost reads them all, to hand out only CDI names the
# runtime resolves and to see vendor specs that clash with its own.
cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]

[pod_resources]
socket = "{{ .Values.podResourcesDir }}/kubelet.sock"

[dra]
device_taints = {{ .Values.dra.deviceTaints | default false }}

[log]
format = {{ .Values.log.format | quote }}
level = {{ .Values.log.level | quote }}
{{- end }}
