{{/*
Each service's ConfigMap data: the ADACCEL_* settings of its pydantic settings class
(services/<name>/settings.py). Chart-owned fields come from values; the rest from
<service>.settings. tests/unit/k8s checks every key against the settings classes.
Not here: per-pod values set as container env (ADACCEL_SHARD, ADACCEL_DECODER_ID).
*/}}

{{- define "adaccel.router.config" -}}
{{ include "adaccel.commonConfig" . }}
ADACCEL_DECODER_ADDRS: {{ include "adaccel.decoderAddrs" . | quote }}
{{- include "adaccel.settingsConfig" (dict "settings" .Values.router.settings) }}
{{- end -}}

{{- define "adaccel.decoder.config" -}}
{{ include "adaccel.commonConfig" . }}
{{ include "adaccel.kafkaConfig" . }}
ADACCEL_MODEL_PATH: {{ include "adaccel.modelPath" . | quote }}
ADACCEL_DEVICE: {{ ternary "cuda" "cpu" (gt (int .Values.decoder.gpu.count) 0) | quote }}
ADACCEL_POOL_ADDR: {{ printf "%s:%d" (include "adaccel.componentName" (dict "ctx" . "component" "pool")) (int .Values.grpcPort) | quote }}
ADACCEL_KVSTORE_ADDRS: {{ include "adaccel.kvstoreAddrs" . | quote }}
{{- include "adaccel.settingsConfig" (dict "settings" .Values.decoder.settings) }}
{{- end -}}

{{- define "adaccel.kvstore.config" -}}
{{ include "adaccel.commonConfig" . }}
{{- include "adaccel.settingsConfig" (dict "settings" .Values.kvstore.settings) }}
{{- end -}}

{{- define "adaccel.pool.config" -}}
{{ include "adaccel.commonConfig" . }}
{{ include "adaccel.kafkaConfig" . }}
{{- if .Values.pool.modelTokenizer }}
ADACCEL_MODEL_PATH: {{ include "adaccel.modelPath" . | quote }}
{{- end }}
{{- include "adaccel.settingsConfig" (dict "settings" .Values.pool.settings) }}
{{- end -}}
