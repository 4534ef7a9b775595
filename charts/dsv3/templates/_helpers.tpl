{{/* Common names and labels. */}}
{{- define "dsv3.fullname" -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- define "dsv3.labels" -}}
app.kubernetes.io/name: dsv3
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "dsv3.selector" -}}
app.kubernetes.io/name: dsv3
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "dsv3.redisUrl" -}}
{{- if .Values.redis.enabled -}}redis://{{ include "dsv3.fullname" . }}-redis.{{ .Release.Namespace }}.svc:6379/0{{- else -}}{{ .Values.redis.url }}{{- end -}}
{{- end -}}
{{- define "dsv3.checkpointAddress" -}}
{{- if .Values.checkpoint.enabled -}}{{ include "dsv3.fullname" . }}-checkpoint.{{ .Release.Namespace }}.svc:{{ .Values.checkpoint.port }}{{- end -}}
{{- end -}}
{{- define "dsv3.placement" -}}
{{- with .Values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}
