{{/* Chart name, truncated to a DNS label. */}}
{{- define "natsmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart>, or the release name when it
already contains the chart name. Truncated so suffixes like "-nats-bootstrap"
still fit 63 characters.
*/}}
{{- define "natsmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "natsmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "natsmesh.labels" -}}
helm.sh/chart: {{ include "natsmesh.chart" . }}
app.kubernetes.io/name: {{ include "natsmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: natsmesh
{{- end }}

{{/* Selector labels; pass (dict "ctx" $ "component" "operator"). */}}
{{- define "natsmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "natsmesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Full labels of one component; pass (dict "ctx" $ "component" "operator"). */}}
{{- define "natsmesh.componentLabels" -}}
{{ include "natsmesh.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "natsmesh.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "natsmesh.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "natsmesh.operatorImage" -}}
{{- printf "%s:%s" .Values.image.operator.repository (.Values.image.operator.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "natsmesh.sidecarImage" -}}
{{- printf "%s:%s" .Values.image.sidecar.repository (.Values.image.sidecar.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "natsmesh.natsName" -}}
{{- printf "%s-nats" (include "natsmesh.fullname" .) }}
{{- end }}

{{/* The NATS URL the operator uses: the in-chart client Service, or the external URL. */}}
{{- define "natsmesh.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc:4222" (include "natsmesh.natsName" .) .Release.Namespace }}
{{- else }}
{{- required "nats.external.url is required when nats.enabled is false" .Values.nats.external.url }}
{{- end }}
{{- end }}

{{- define "natsmesh.sidecarNatsUrl" -}}
{{- default (include "natsmesh.natsUrl" .) .Values.sidecar.natsUrl }}
{{- end }}

{{/* True ("true") when the chart's hook Job creates the bootstrap Secret. */}}
{{- define "natsmesh.bootstrapManaged" -}}
{{- if or .Values.nats.enabled (not .Values.nats.external.bootstrapSecret) }}true{{ end }}
{{- end }}

{{/* Name of the Secret with the NATS bootstrap material (release namespace). */}}
{{- define "natsmesh.bootstrapSecret" -}}
{{- if and (not .Values.nats.enabled) .Values.nats.external.bootstrapSecret }}
{{- .Values.nats.external.bootstrapSecret }}
{{- else }}
{{- printf "%s-nats-bootstrap" (include "natsmesh.fullname" .) }}
{{- end }}
{{- end }}

{{- define "natsmesh.webhookService" -}}
{{- printf "%s-webhook" (include "natsmesh.fullname" .) }}
{{- end }}

{{- define "natsmesh.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "natsmesh.fullname" .) }}
{{- end }}

{{/* Secret with the CA of the API server's webhook client certificate (webhook.clientAuth). */}}
{{- define "natsmesh.webhookClientSecret" -}}
{{- .Values.webhook.clientAuth.caSecret.name | default (printf "%s-webhook-client" (include "natsmesh.fullname" .)) }}
{{- end }}

{{/* Non-empty when the chart generates that CA and the client certificate. */}}
{{- define "natsmesh.webhookClientGenerated" -}}
{{- if and .Values.webhook.clientAuth.enabled (not .Values.webhook.clientAuth.caSecret.name) }}true{{ end }}
{{- end }}

{{/* The accepted client names, comma-separated (NATSMESH_WEBHOOK_CLIENT_NAMES). */}}
{{- define "natsmesh.webhookClientNames" -}}
{{- $auth := .Values.webhook.clientAuth }}
{{- $names := $auth.allowedNames | default list }}
{{- if and (not $names) (include "natsmesh.webhookClientGenerated" .) }}
{{- $names = list $auth.generatedCommonName }}
{{- end }}
{{- join "," $names }}
{{- end }}

{{/* Restricted-profile container securityContext (uid 65532 unless overridden). */}}
{{- define "natsmesh.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .uid | default 65532 }}
runAsGroup: {{ .uid | default 65532 }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "natsmesh.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 65532 }}
runAsGroup: {{ .uid | default 65532 }}
fsGroup: {{ .uid | default 65532 }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Headless Service of the NATS StatefulSet (pod DNS names, routes). */}}
{{- define "natsmesh.natsHeadless" -}}
{{- printf "%s-headless" (include "natsmesh.natsName" .) }}
{{- end }}

{{/* True ("true") when the in-chart NATS runs as a cluster (routes exist). */}}
{{- define "natsmesh.natsClustered" -}}
{{- if and .Values.nats.enabled (gt (int .Values.nats.replicas) 1) }}true{{ end }}
{{- end }}

{{/* True ("true") when the routes use mutual TLS. */}}
{{- define "natsmesh.routeTls" -}}
{{- if and (include "natsmesh.natsClustered" .) .Values.nats.cluster.tls.enabled }}true{{ end }}
{{- end }}

{{/* Secret with the route user, its password and the routes.conf include built from them. */}}
{{- define "natsmesh.natsRoutesSecret" -}}
{{- printf "%s-routes" (include "natsmesh.natsName" .) }}
{{- end }}

{{/* Secret with the route certificate, key and CA (kubernetes.io/tls + ca.crt). */}}
{{- define "natsmesh.natsRoutesTlsSecret" -}}
{{- printf "%s-routes-tls" (include "natsmesh.natsName" .) }}
{{- end }}

{{/*
DNS names of the route certificate: every NATS pod under the headless Service
(<pod>.<headless>.<ns>.svc, as the routes name them), as one wildcard per form.
*/}}
{{- define "natsmesh.natsRouteDnsNames" -}}
{{- $headless := include "natsmesh.natsHeadless" . }}
{{- $ns := .Release.Namespace }}
{{- list (printf "*.%s.%s.svc" $headless $ns) (printf "*.%s.%s.svc.cluster.local" $headless $ns) (printf "*.%s.%s" $headless $ns) (printf "*.%s" $headless) | toJson }}
{{- end }}

{{/* The port nats-server's monitoring listener uses inside the pod. */}}
{{- define "natsmesh.natsMonitorPort" -}}8222{{- end }}

{{/*
Pod selector of the component's pods, as a NetworkPolicyPeer podSelector body;
pass (dict "ctx" $ "component" "nats").
*/}}
{{- define "natsmesh.podPeer" -}}
podSelector:
  matchLabels:
    {{- include "natsmesh.selectorLabels" . | nindent 4 }}
{{- end }}

{{/*
An exec probe of nats-server's monitoring endpoint over the pod's loopback;
pass the path (with query). The port comes from the container's env.
*/}}
{{- define "natsmesh.natsProbe" -}}
exec:
  command:
    - sh
    - -c
    - {{ printf "exec wget -q -T 4 -O /dev/null \"http://127.0.0.1:${NATS_MONITOR_PORT}%s\"" . | quote }}
{{- end }}
