{{/* Names, labels and the pieces every Quarry pod shares. */}}

{{- define "quarry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "quarry.fullname" -}}
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

{{/* <fullname>-<component>, within 63 characters. Call with (list $ "component"). */}}
{{- define "quarry.componentName" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- printf "%s-%s" (include "quarry.fullname" $root | trunc (int (sub 62 (len $component)))) $component | trimSuffix "-" -}}
{{- end -}}

{{- define "quarry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "quarry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quarry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "quarry.labels" -}}
helm.sh/chart: {{ include "quarry.chart" . }}
{{ include "quarry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: quarry
{{- end -}}

{{/* Labels of one component's objects. Call with (list $ "component"). */}}
{{- define "quarry.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "quarry.labels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Selector (and pod) labels of one component; stable across chart versions, so they may sit in
immutable pod templates. Call with (list $ "component"). */}}
{{- define "quarry.componentSelectorLabels" -}}
{{- $root := index . 0 -}}
{{ include "quarry.selectorLabels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "quarry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "quarry.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "quarry.secretName" -}}
{{- if .Values.secrets.create -}}
{{- include "quarry.fullname" . -}}
{{- else -}}
{{- required "secrets.existingSecret: name the Secret holding Quarry's credentials (or set secrets.create for a development install)" .Values.secrets.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The image of a component. Call with (list $ .Values.<component>.image). */}}
{{- define "quarry.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- $tag := $image.tag | default $root.Values.image.tag | default $root.Chart.AppVersion -}}
{{- if $root.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $root.Values.image.registry) $image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "quarry.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Credentials are files, not environment variables: a process's environment is readable by
whatever else runs as its user, is copied into every child it starts, and ends up in crash
reports. They are mounted outside /etc, which the consumer's sandbox shows read-only to packages,
so the sandbox never sees them at all. */}}
{{- define "quarry.credentialsDir" -}}
/run/secrets/quarry
{{- end -}}

{{/* The variable naming the file of one credential. Call with (list $ "VAR_FILE" "keyName"). */}}
{{- define "quarry.credentialEnv" -}}
{{- $root := index . 0 -}}
- name: {{ index . 1 }}
  value: {{ printf "%s/%s" (include "quarry.credentialsDir" $root) (index $root.Values.secrets.keys (index . 2)) | quote }}
{{- end -}}

{{/* The credentials Secret as a volume holding only the given keys. Call with
(list $ "keyName" ...). Readable by the pod's group (fsGroup) only. */}}
{{- define "quarry.credentialsVolume" -}}
{{- $root := index . 0 -}}
- name: credentials
  secret:
    secretName: {{ include "quarry.secretName" $root }}
    defaultMode: 0440
    items:
      {{- range $name := rest . }}
      - key: {{ index $root.Values.secrets.keys $name }}
        path: {{ index $root.Values.secrets.keys $name }}
      {{- end }}
{{- end -}}

{{- define "quarry.credentialsVolumeMount" -}}
- name: credentials
  mountPath: {{ include "quarry.credentialsDir" . }}
  readOnly: true
{{- end -}}

{{/* Environment every component gets: the configuration file, the database and broker URLs, the
log filter. */}}
{{- define "quarry.commonEnv" -}}
- name: QUARRY_CONFIG
  value: /etc/quarry/quarry.toml
{{ include "quarry.credentialEnv" (list . "QUARRY_DATABASE_URL_FILE" "databaseUrl") }}
{{ include "quarry.credentialEnv" (list . "QUARRY_AMQP_URL_FILE" "amqpUrl") }}
{{- with .Values.config.logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- with .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- include "quarry.caEnv" . }}
{{- end -}}

{{/* With tls.caConfigMap: where the private CA is mounted, and the variables that trust it. */}}
{{- define "quarry.caFile" -}}
/etc/quarry-tls/{{ .Values.tls.key }}
{{- end -}}

{{- define "quarry.caEnv" -}}
{{- if .Values.tls.caConfigMap }}
{{- range list "QUARRY_DATABASE_CA_FILE" "QUARRY_AMQP_CA_FILE" "QUARRY_S3_CA_FILE" }}
- name: {{ . }}
  value: {{ include "quarry.caFile" $ | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "quarry.caVolumeMount" -}}
{{- if .Values.tls.caConfigMap }}
- name: tls-ca
  mountPath: /etc/quarry-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "quarry.caVolume" -}}
{{- if .Values.tls.caConfigMap }}
- name: tls-ca
  configMap:
    name: {{ .Values.tls.caConfigMap }}
    items:
      - key: {{ .Values.tls.key }}
        path: {{ .Values.tls.key }}
{{- end }}
{{- end -}}

{{/* The security context of every container but the sandboxed consumer's: non-root, no
capabilities, no privilege escalation, read-only root, the runtime's default seccomp profile. */}}
{{- define "quarry.restrictedContainerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "quarry.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The arguments of `quarry-producer run` for the run definition, without --name. */}}
{{- define "quarry.runArgs" -}}
{{- $run := .Values.run -}}
{{- range $run.toolchains }}
- --toolchain
- {{ . | quote }}
{{- end }}
- --mode
- {{ $run.mode | quote }}
- --timeout
- {{ $run.timeout | int64 | quote }}
- --memory-limit
- {{ $run.memoryLimitMb | int64 | quote }}
{{- if $run.packageList }}
- --list
- /etc/quarry/run/packages.txt
{{- else if $run.packages }}
{{- range $run.packages }}
- --package
- {{ . | quote }}
{{- end }}
{{- else }}
- --sort
- {{ $run.sort | quote }}
{{- if gt (int64 $run.limit) 0 }}
- --limit
- {{ $run.limit | int64 | quote }}
{{- end }}
{{- end }}
{{- if $run.fresh }}
- --fresh
{{- end }}
{{- if $run.wait }}
- --wait
{{- end }}
{{- end -}}

{{/* The pod spec of a producer `run`. Call with (list $ "<run name argument>" extraEnv). */}}
{{- define "quarry.producerRunPodSpec" -}}
{{- $root := index . 0 -}}
{{- $nameArg := index . 1 -}}
{{- $extraEnv := index . 2 -}}
{{- $values := $root.Values -}}
serviceAccountName: {{ include "quarry.serviceAccountName" $root }}
automountServiceAccountToken: false
restartPolicy: Never
{{- include "quarry.imagePullSecrets" $root }}
securityContext:
  {{- include "quarry.podSecurityContext" $root | nindent 2 }}
{{- with $values.producer.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $values.producer.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.producer.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.producer.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: producer
    image: {{ include "quarry.image" (list $root $values.producer.image) }}
    imagePullPolicy: {{ $values.image.pullPolicy }}
    args:
      - run
      - --name
      - {{ $nameArg | quote }}
      {{- include "quarry.runArgs" $root | nindent 6 }}
    env:
      {{- include "quarry.commonEnv" $root | nindent 6 }}
      {{- with $extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
      {{- with $values.producer.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    securityContext:
      {{- include "quarry.restrictedContainerSecurityContext" $root | nindent 6 }}
    {{- with $values.producer.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: config
        mountPath: /etc/quarry
        readOnly: true
      - name: tmp
        mountPath: /tmp
      {{- include "quarry.credentialsVolumeMount" $root | nindent 6 }}
      {{- include "quarry.caVolumeMount" $root | nindent 6 }}
volumes:
  - name: config
    projected:
      sources:
        - configMap:
            name: {{ include "quarry.fullname" $root }}
            items:
              - key: quarry.toml
                path: quarry.toml
        {{- if $values.run.packageList }}
        - configMap:
            name: {{ include "quarry.componentName" (list $root "run") }}
            items:
              - key: packages.txt
                path: run/packages.txt
        {{- end }}
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
  {{- include "quarry.credentialsVolume" (list $root "databaseUrl" "amqpUrl") | nindent 2 }}
  {{- include "quarry.caVolume" $root | nindent 2 }}
{{- end -}}

{{/* Fails the render unless the settings agree with one another. */}}
{{- define "quarry.checks" -}}
{{- $c := .Values.consumer -}}
{{- if le (int64 $c.terminationGracePeriodSeconds) (int64 $c.shutdownGraceSeconds) -}}
{{- fail (printf "consumer.terminationGracePeriodSeconds (%d) must exceed consumer.shutdownGraceSeconds (%d): Kubernetes kills the pod when the former runs out" (int64 $c.terminationGracePeriodSeconds) (int64 $c.shutdownGraceSeconds)) -}}
{{- end -}}
{{- if lt (int64 $c.shutdownGraceSeconds) (int64 .Values.run.timeout) -}}
{{- fail (printf "consumer.shutdownGraceSeconds (%d) must be at least run.timeout (%d), so a stopping consumer can finish the job in hand" (int64 $c.shutdownGraceSeconds) (int64 .Values.run.timeout)) -}}
{{- end -}}
{{- if and .Values.run.enabled (not .Values.run.name) -}}
{{- fail "run.enabled needs run.name" -}}
{{- end -}}
{{- if and .Values.run.packages .Values.run.packageList -}}
{{- fail "run.packages and run.packageList cannot both be given" -}}
{{- end -}}
{{- if not .Values.config.s3.endpoint -}}
{{- fail "config.s3.endpoint is required (for AWS itself: https://s3.<region>.amazonaws.com)" -}}
{{- end -}}
{{- if and .Values.keda.enabled (not .Values.secrets.keys.rabbitmqManagementUrl) -}}
{{- fail "keda.enabled needs secrets.keys.rabbitmqManagementUrl: KEDA reads the queue through the RabbitMQ management API" -}}
{{- end -}}
{{- if .Values.secrets.create -}}
{{- range $key := list "databaseUrl" "amqpUrl" "s3AccessKeyId" "s3SecretAccessKey" -}}
{{- if not (index $.Values.secrets.values $key) -}}
{{- fail (printf "secrets.create needs secrets.values.%s" $key) -}}
{{- end -}}
{{- end -}}
{{- if and $.Values.keda.enabled (not $.Values.secrets.values.rabbitmqManagementUrl) -}}
{{- fail "secrets.create with keda.enabled needs secrets.values.rabbitmqManagementUrl" -}}
{{- end -}}
{{- end -}}
{{- end -}}
