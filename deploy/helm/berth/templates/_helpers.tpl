{{- define "berth.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "berth.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "berth.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "berth.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "berth.secretName" -}}
{{ .Values.secrets.existingSecret | default (include "berth.fullname" .) }}
{{- end -}}

{{/* What the API and the worker share: the three secrets, Temporal, the database. */}}
{{- define "berth.env" -}}
- name: BERTH_USER_TOKEN_SECRET
  valueFrom: {secretKeyRef: {name: {{ include "berth.secretName" . }}, key: user-token-secret}}
- name: BERTH_GUEST_TOKEN_SECRET
  valueFrom: {secretKeyRef: {name: {{ include "berth.secretName" . }}, key: guest-token-secret}}
- name: BERTH_PAYLOAD_SECRET
  valueFrom: {secretKeyRef: {name: {{ include "berth.secretName" . }}, key: payload-secret}}
- name: BERTH_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret: a Secret with the database URL" .Values.database.existingSecret }}
      key: {{ .Values.database.key }}
- name: BERTH_TEMPORAL_ADDRESS
  value: {{ required "temporal.address: the Temporal cluster's frontend" .Values.temporal.address | quote }}
- name: BERTH_TEMPORAL_NAMESPACE
  value: {{ .Values.temporal.namespace | quote }}
- name: BERTH_LOG_FORMAT
  value: json
- name: BERTH_HOST_ID
  value: {{ .Values.hostId | quote }}
{{- if .Values.temporal.tls.enabled }}
- name: BERTH_TEMPORAL_TLS
  value: "true"
- name: BERTH_TEMPORAL_TLS_CERT_FILE
  value: /etc/berth/temporal-tls/tls.crt
- name: BERTH_TEMPORAL_TLS_KEY_FILE
  value: /etc/berth/temporal-tls/tls.key
{{- with .Values.temporal.tls.serverName }}
- name: BERTH_TEMPORAL_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "berth.temporalTlsVolume" -}}
{{- if .Values.temporal.tls.enabled }}
- name: temporal-tls
  secret:
    secretName: {{ required "temporal.tls.existingSecret" .Values.temporal.tls.existingSecret }}
{{- end }}
{{- end -}}

{{- define "berth.temporalTlsMount" -}}
{{- if .Values.temporal.tls.enabled }}
- name: temporal-tls
  mountPath: /etc/berth/temporal-tls
  readOnly: true
{{- end }}
{{- end -}}
