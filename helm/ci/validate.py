#!/usr/bin/env python3
"""Offline validation of Quarry's Helm chart and dashboards; run through helm/validate.

Helm itself comes from helm-python-sdk (the Helm v4 Go SDK as a shared library: no helm binary,
no cluster, no network). Every rendered manifest is checked against the Kubernetes schemas of
kubernetes-validate for one pinned Kubernetes version, in strict mode (unknown fields are errors),
and the custom resources against the CRD schemas in helm/ci/crd-schemas. Exits 1 and lists every
failure if anything fails.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

# The oldest Kubernetes the default sandbox mode works on out of the box (user namespaces and
# ProcMountType on by default); the chart's kubeVersion allows 1.30 for the other modes.
KUBE_VERSION = "1.33.0"
RELEASE = "quarry"
NAMESPACE = "quarry"

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "quarry"
CI = ROOT / "helm" / "ci"
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
EXAMPLE_CONFIG = ROOT / "docs" / "quarry.example.toml"

# The only metric names the dashboards may use (consumer /metrics, reporter `serve` /metrics).
ALLOWED_METRICS = {
    "quarry_consumer_jobs_total",
    "quarry_consumer_job_duration_seconds_bucket",
    "quarry_consumer_job_duration_seconds_sum",
    "quarry_consumer_job_duration_seconds_count",
    "quarry_consumer_jobs_in_progress",
    "quarry_consumer_fetches_total",
    "quarry_consumer_fetch_bytes_total",
    "quarry_consumer_s3_unavailable_total",
    "quarry_consumer_attempts_failed_total",
    "quarry_consumer_dead_lettered_total",
    "quarry_consumer_duplicates_skipped_total",
    "quarry_consumer_memoized_total",
    "quarry_consumer_sandbox_kills_total",
    "quarry_consumer_refused_total",
    "quarry_consumer_waits_total",
    "quarry_consumer_jobs_given_way_total",
    "quarry_consumer_broker_connections_total",
    "quarry_consumer_channels_lost_total",
    "quarry_consumer_leases_lapsed_total",
    "quarry_run_jobs",
    "quarry_run_outcomes",
    "quarry_run_rate_jobs_per_second",
    "quarry_run_eta_seconds",
    "quarry_run_categories",
    "quarry_queue_messages_ready",
    "quarry_queue_consumers",
    "quarry_fleet_consumers",
    "up",
}

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
}

failures: list[str] = []


def ok(message: str) -> None:
    print(f"ok   {message}")


def fail(message: str) -> None:
    failures.append(message)
    print(f"FAIL {message}")


def check(condition: bool, message: str) -> bool:
    (ok if condition else fail)(message)
    return condition


def section(title: str) -> None:
    print(f"\n== {title}")


# ---------------------------------------------------------------------------------------------
# Rendering


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI / name).read_text()) or {}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The chart's manifests for `values`, as (template, document) pairs."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                docs.append((template, doc))
    return docs


def by_kind(docs: list[tuple[str, dict]], kind: str) -> list[dict]:
    return [doc for _, doc in docs if doc.get("kind") == kind]


def one(docs: list[tuple[str, dict]], kind: str, component: str) -> dict | None:
    found = [
        doc
        for doc in by_kind(docs, kind)
        if doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    ]
    return found[0] if len(found) == 1 else None


def pod_specs(docs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    specs = []
    for _, doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Deployment", "Job"):
            specs.append((f"{kind}/{name}", doc["spec"]["template"]["spec"]))
        elif kind == "CronJob":
            specs.append((f"{kind}/{name}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


# ---------------------------------------------------------------------------------------------
# Schemas


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI schema refusing the fields it does not declare."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def object_meta_validator() -> jsonschema.Validator:
    definitions = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{KUBE_VERSION}-local-strict/_definitions.json", KUBE_VERSION
    )
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    schema = {"$ref": f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


CRD_VALIDATORS = {
    key: jsonschema.Draft7Validator(strict(json.loads((CI / "crd-schemas" / name).read_text())))
    for key, name in CRD_SCHEMAS.items()
}
OBJECT_META = object_meta_validator()


def error_text(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"at {where}: {error.message[:300]}"


def validate_manifests(scenario: str, docs: list[tuple[str, dict]]) -> None:
    failed_before = len(failures)
    seen = set()
    crds = 0
    for template, doc in docs:
        ident = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        label = f"{scenario}: {ident} ({template.split('/', 1)[-1]})"
        key = (doc.get("apiVersion"), doc.get("kind"), doc.get("metadata", {}).get("name"))
        if key in seen:
            fail(f"{label}: rendered twice")
        seen.add(key)
        crd = CRD_VALIDATORS.get((doc.get("apiVersion"), doc.get("kind")))
        if crd is not None:
            crds += 1
            errors = sorted(crd.iter_errors(doc), key=lambda e: list(e.absolute_path))
            for error in errors:
                fail(f"{label}: {error_text(error)}")
            for error in sorted(OBJECT_META.iter_errors(doc.get("metadata", {})), key=lambda e: list(e.absolute_path)):
                fail(f"{label}: metadata: {error_text(error)}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            fail(f"{label}: {error_text(error)}")
        except kubernetes_validate.SchemaNotFoundError as error:
            fail(f"{label}: no schema: {error.message}")
    if len(failures) == failed_before:
        ok(f"{scenario}: {len(docs)} manifests valid for Kubernetes {KUBE_VERSION} (strict), "
           f"{crds} of them against the vendored CRD schemas")


# ---------------------------------------------------------------------------------------------
# Checks of what the manifests say


def config_keys_of_example() -> dict[str, set[str]]:
    """Keys docs/quarry.example.toml documents per section, the commented-out ones included."""
    keys: dict[str, set[str]] = {}
    section_name = None
    for line in EXAMPLE_CONFIG.read_text().splitlines():
        header = re.match(r"^\[([\w.]+)\]", line)
        if header:
            section_name = header.group(1)
            keys[section_name] = set()
            continue
        key = re.match(r"^#?\s*([a-z_]+)\s*=", line)
        if key and section_name:
            keys[section_name].add(key.group(1))
    return keys


def check_common(scenario: str, docs: list[tuple[str, dict]], values: dict[str, Any]) -> None:
    # Pods: no service account token, non-root.
    for name, spec in pod_specs(docs):
        check(spec.get("automountServiceAccountToken") is False, f"{scenario}: {name} mounts no service account token")
        pod_sc = spec.get("securityContext", {})
        for container in spec["containers"]:
            sc = container.get("securityContext", {})
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if not (non_root and uid == 10001):
                fail(f"{scenario}: {name}/{container['name']} must run as non-root UID 10001")

    # Secrets: only with secrets.create.
    secrets = by_kind(docs, "Secret")
    if values.get("secrets", {}).get("create"):
        check(len(secrets) == 1, f"{scenario}: secrets.create renders one Secret")
    else:
        check(not secrets, f"{scenario}: no Secret rendered from values (existingSecret only)")

    # Credentials: files from the Secret, outside /etc (which the sandbox shows), never
    # environment variables.
    for name, spec in pod_specs(docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            env = c.get("env", [])
            from_secret = [e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})]
            check(not from_secret, f"{scenario}: {name}/{c['name']} takes no credential as an environment variable {from_secret or ''}")
            files = [e.get("value", "") for e in env if e["name"] in (
                "QUARRY_DATABASE_URL_FILE", "QUARRY_AMQP_URL_FILE",
                "QUARRY_S3_ACCESS_KEY_ID_FILE", "QUARRY_S3_SECRET_ACCESS_KEY_FILE")]
            mount = next((m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] == "credentials"), None)
            shipped = {i["path"] for i in volumes.get("credentials", {}).get("secret", {}).get("items", [])}
            check(
                bool(files) and mount is not None and not mount.startswith("/etc")
                and all(f.startswith(mount + "/") and f[len(mount) + 1:] in shipped for f in files),
                f"{scenario}: {name}/{c['name']} reads its credentials from the Secret's files, mounted outside /etc",
            )

    # quarry.toml: valid TOML, only keys Quarry knows.
    configs = [d for d in by_kind(docs, "ConfigMap") if "quarry.toml" in d.get("data", {})]
    if not check(len(configs) == 1, f"{scenario}: one ConfigMap carries quarry.toml"):
        return
    try:
        toml = tomllib.loads(configs[0]["data"]["quarry.toml"])
    except tomllib.TOMLDecodeError as error:
        fail(f"{scenario}: quarry.toml is not TOML: {error}")
        return
    known = config_keys_of_example()
    def tables(table: dict, prefix: str = ""):
        """Each table of the file by its dotted name ("consumer.toolchains"), with its plain keys."""
        for name, value in table.items():
            if isinstance(value, dict):
                full = f"{prefix}{name}"
                yield full, [k for k, v in value.items() if not isinstance(v, dict)]
                yield from tables(value, f"{full}.")

    unknown = [f"{s}.{k}" for s, keys in tables(toml) for k in keys if k not in known.get(s, set())]
    check(not unknown, f"{scenario}: quarry.toml uses only keys of docs/quarry.example.toml {unknown or ''}")
    secret_keys = [f"{s}.{k}" for s, table in toml.items() for k in table if k in ("url", "access_key_id", "secret_access_key")]
    check(not secret_keys, f"{scenario}: quarry.toml holds no credentials {secret_keys or ''}")

    # Consumers: metrics on 9100, grace periods that let a job finish.
    consumer = one(docs, "Deployment", "consumer")
    if not check(consumer is not None, f"{scenario}: one consumer Deployment"):
        return
    spec = consumer["spec"]["template"]["spec"]
    container = spec["containers"][0]
    port = values.get("consumer", {}).get("metricsPort", 9100)
    check(
        "--metrics-listen" in container["args"] and f"0.0.0.0:{port}" in container["args"],
        f"{scenario}: consumer serves metrics with --metrics-listen 0.0.0.0:{port}",
    )
    grace = toml["consumer"]["shutdown_grace_secs"]
    check(
        spec["terminationGracePeriodSeconds"] > grace,
        f"{scenario}: terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} > shutdown_grace_secs {grace}",
    )
    volumes = {v["name"]: v for v in spec["volumes"]}
    check(
        any(m["name"] == "work" and m["mountPath"] == toml["consumer"]["work_dir"] for m in container["volumeMounts"])
        and "work" in volumes,
        f"{scenario}: the consumer's work_dir is its work volume",
    )
    check(spec.get("shareProcessNamespace") is True,
          f"{scenario}: the consumer pod shares its PID namespace (the pause process reaps orphans)")
    mode = values.get("consumer", {}).get("sandbox", {}).get("mode", "userns")
    sc = container["securityContext"]
    if mode == "userns":
        check(
            spec.get("hostUsers") is False
            and sc.get("procMount") == "Unmasked"
            and sc.get("allowPrivilegeEscalation") is False
            and sc.get("capabilities", {}).get("drop") == ["ALL"]
            and sc.get("readOnlyRootFilesystem") is True
            and not sc.get("privileged"),
            f"{scenario}: userns sandbox: own user namespace, unmasked /proc, no capabilities, read-only root",
        )
        # As docker/run-local ran the consumer image (testkit/src/images.rs): these paths and
        # profiles are what was proven to work, so the chart may not drift from them.
        proven = dict(re.findall(r'const (\w+): (?:&str|u32) = "?([^";]+)"?;', (ROOT / "testkit/src/images.rs").read_text()))
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        check(
            mounts.get("work") == proven.get("WORK_DIR") == env.get("QUARRY_CONSUMER_WORK_DIR")
            and mounts.get("credentials") == proven.get("SECRETS_DIR")
            and env.get("QUARRY_CONFIG") == proven.get("CONFIG_FILE")
            and mounts.get("tmp") == "/tmp"
            and sc.get("runAsUser") == sc.get("runAsGroup") == int(proven.get("IMAGE_UID", "0"))
            # (or the tighter Localhost profiles docs/operations.md describes, not run here)
            and all(sc.get(profile, {}).get("type") in ("Unconfined", "Localhost")
                    for profile in ("seccompProfile", "appArmorProfile")),
            f"{scenario}: the consumer container is as docker/run-local ran it (work {proven.get('WORK_DIR')}, "
            f"credentials {proven.get('SECRETS_DIR')}, {proven.get('CONFIG_FILE')}, /tmp, UID {proven.get('IMAGE_UID')}, unconfined)",
        )
    elif mode == "privileged":
        check(sc.get("privileged") is True and "hostUsers" not in spec, f"{scenario}: privileged sandbox mode")
    else:
        check("--unsandboxed" in container["args"] and sc.get("allowPrivilegeEscalation") is False,
              f"{scenario}: sandbox mode none runs --unsandboxed in a restricted container")

    # The run template: a suspended CronJob naming runs after their Job.
    cron = one(docs, "CronJob", "producer")
    if values.get("producer", {}).get("runTemplate", {}).get("enabled", True):
        if check(cron is not None and cron["spec"]["suspend"] is True, f"{scenario}: suspended producer CronJob"):
            pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e for e in pod["env"]}
            check(
                pod["args"][:3] == ["run", "--name", "$(QUARRY_RUN_NAME)"]
                and env.get("QUARRY_RUN_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                == "metadata.labels['batch.kubernetes.io/job-name']",
                f"{scenario}: CronJob runs are named after their Job",
            )

    # Migrations: a pre-install/pre-upgrade hook.
    migrate = one(docs, "Job", "migrate")
    if values.get("producer", {}).get("migrations", {}).get("enabled", True):
        check(
            migrate is not None
            and migrate["metadata"]["annotations"].get("helm.sh/hook") == "pre-install,pre-upgrade"
            and migrate["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"],
            f"{scenario}: migrations run as a pre-install/pre-upgrade hook (quarry-producer migrate)",
        )

    # Dashboards for the Grafana sidecar.
    if values.get("dashboards", {}).get("enabled", True):
        boards = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
        if check(len(boards) == 1, f"{scenario}: dashboards ConfigMap labelled grafana_dashboard: \"1\""):
            files = {p.name: p.read_text() for p in sorted((CHART / "dashboards").glob("*.json"))}
            data = {k: v for k, v in boards[0]["data"].items()}
            check(
                {k: v.rstrip("\n") for k, v in data.items()} == {k: v.rstrip("\n") for k, v in files.items()},
                f"{scenario}: the ConfigMap carries the dashboards unchanged ({', '.join(sorted(data))})",
            )


def check_full(docs: list[tuple[str, dict]], values: dict[str, Any]) -> None:
    scenario = "full-values"
    kinds = {doc["kind"] for _, doc in docs}
    for kind in ("ScaledObject", "TriggerAuthentication", "ServiceMonitor", "NetworkPolicy", "Ingress",
                 "PodDisruptionBudget", "PersistentVolumeClaim", "CronJob", "Job"):
        check(kind in kinds, f"{scenario}: renders a {kind}")

    configs = [doc for _, doc in docs if doc["kind"] == "ConfigMap" and "quarry.toml" in doc.get("data", {})]
    reporter = tomllib.loads(configs[0]["data"]["quarry.toml"]).get("reporter", {})
    check(
        reporter.get("report_url") == values["reporter"]["reportUrl"]
        and reporter.get("live_report_secs") == values["reporter"]["liveReportSeconds"],
        f"{scenario}: the reporter's report_url and live_report_secs come from its values",
    )

    scaled = by_kind(docs, "ScaledObject")[0]
    trigger = scaled["spec"]["triggers"][0]
    meta = trigger["metadata"]
    check(
        trigger["type"] == "rabbitmq" and meta.get("protocol") == "http" and meta.get("mode") == "QueueLength"
        and "excludeUnacknowledged" not in meta,
        f"{scenario}: KEDA counts ready + unacknowledged messages (rabbitmq, protocol http, QueueLength)",
    )
    pattern = re.compile(meta["queueName"])
    prefix = values["config"]["rabbitmq"]["prefix"]
    delays = values["config"]["rabbitmq"]["retryDelaysMs"]
    counted = [f"{prefix}.jobs"] + [f"{prefix}.jobs.retry.{d}ms" for d in delays]
    check(
        meta.get("useRegex") == "true"
        and all(pattern.search(q) for q in counted)
        and not pattern.search(f"{prefix}.jobs.dead")
        and not pattern.search(f"x{prefix}.jobs"),
        f"{scenario}: the trigger's queues are {', '.join(counted)} (not {prefix}.jobs.dead)",
    )
    auth = by_kind(docs, "TriggerAuthentication")[0]
    check(
        trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        and auth["spec"]["secretTargetRef"][0]["parameter"] == "host",
        f"{scenario}: the TriggerAuthentication gives the trigger its host from the Secret",
    )
    consumer = one(docs, "Deployment", "consumer")
    check("replicas" not in consumer["spec"], f"{scenario}: with KEDA the Deployment leaves replicas to it")
    check(scaled["spec"]["scaleTargetRef"]["name"] == consumer["metadata"]["name"],
          f"{scenario}: the ScaledObject scales the consumer Deployment")

    jobs = [j for j in by_kind(docs, "Job") if j["metadata"]["labels"].get("app.kubernetes.io/component") == "producer"]
    if check(len(jobs) == 1, f"{scenario}: run.enabled renders one producer Job"):
        job = jobs[0]
        name = job["metadata"]["name"]
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        check(len(name) <= 63 and "nightly-vs-stable-2026-11" in name,
              f"{scenario}: the run Job's name carries the run name ({name})")
        check(args[:3] == ["run", "--name", values["run"]["name"]] and "--list" in args and "--fresh" in args,
              f"{scenario}: the run Job runs `quarry-producer run --name {values['run']['name']} --list ...`")

    ca = values["tls"]["caConfigMap"]
    for name, spec in pod_specs(docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounted = all(
            any(m["name"] == "tls-ca" for m in c.get("volumeMounts", []))
            and {e["name"]: e.get("value") for e in c.get("env", [])}.get("QUARRY_DATABASE_CA_FILE")
            == "/etc/quarry-tls/" + values["tls"]["key"]
            for c in spec["containers"]
        )
        check(
            volumes.get("tls-ca", {}).get("configMap", {}).get("name") == ca and mounted,
            f"{scenario}: {name} mounts the CA ConfigMap {ca} and trusts it (QUARRY_*_CA_FILE)",
        )

    policies = by_kind(docs, "NetworkPolicy")
    check(
        len(policies) == 4 and all(p["spec"]["policyTypes"] == ["Egress"] for p in policies),
        f"{scenario}: egress NetworkPolicies for consumer, producer, migrations and reporter",
    )
    for policy in policies:
        ports = sorted({p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]})
        if not all(rule["to"] for rule in policy["spec"]["egress"]):
            fail(f"{scenario}: NetworkPolicy {policy['metadata']['name']} has a rule open to everywhere")
        else:
            ok(f"{scenario}: NetworkPolicy {policy['metadata']['name']}: every rule has destinations (ports {ports})")

    monitors = by_kind(docs, "ServiceMonitor")
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    for monitor in monitors:
        selected = [
            s for s in services.values()
            if all(s["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        ]
        port_names = {p["name"] for s in selected for p in s["spec"]["ports"]}
        job = {s["metadata"]["labels"].get(monitor["spec"]["jobLabel"]) for s in selected}
        check(
            len(selected) == 1 and monitor["spec"]["endpoints"][0]["port"] in port_names
            and monitor["metadata"]["labels"].get("release") == "kube-prometheus-stack",
            f"{scenario}: ServiceMonitor {monitor['metadata']['name']} selects one Service and its port, job={job}",
        )


# ---------------------------------------------------------------------------------------------
# Dashboards


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers not followed by '(' that are not label
    names, keywords or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr):
        word = match.group(1)
        if word in ("and", "or", "unless", "bool", "offset"):
            continue
        names.add(word)
    return names


def check_dashboards() -> None:
    section("dashboards: deploy/grafana and the chart's copies")
    originals = {p.name: p.read_bytes() for p in sorted(GRAFANA.glob("*.json"))}
    copies = {p.name: p.read_bytes() for p in sorted((CHART / "dashboards").glob("*.json"))}
    check(bool(originals), f"deploy/grafana has dashboards: {', '.join(originals)}")
    check(originals.keys() == copies.keys(),
          f"helm/quarry/dashboards holds the same files as deploy/grafana ({', '.join(sorted(copies))})")
    for name in sorted(originals.keys() & copies.keys()):
        check(originals[name] == copies[name], f"helm/quarry/dashboards/{name} is identical to deploy/grafana/{name}")

    uids = set()
    for name, raw in originals.items():
        try:
            board = json.loads(raw)
        except json.JSONDecodeError as error:
            fail(f"{name}: not JSON: {error}")
            continue
        uid = board.get("uid")
        check(bool(uid) and uid not in uids, f"{name}: unique uid {uid!r}")
        uids.add(uid)
        variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}
        check(variables.get("datasource", {}).get("type") == "datasource"
              and variables["datasource"].get("query") == "prometheus",
              f"{name}: templated Prometheus data source variable ${{datasource}}")
        used: set[str] = set()
        bad_sources = []
        exprs = []
        for panel in board.get("panels", []):
            for item in [panel] + panel.get("targets", []):
                source = item.get("datasource")
                if source is not None and panel.get("type") != "row" and source.get("uid") != "${datasource}":
                    bad_sources.append(panel.get("title"))
            for target in panel.get("targets", []):
                exprs.append(target["expr"])
        for variable in variables.values():
            if variable.get("type") == "query":
                exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", variable["definition"]))
        for expr in exprs:
            used |= metric_names(expr)
        check(not bad_sources, f"{name}: every panel queries ${{datasource}} {bad_sources or ''}")
        unknown = sorted(used - ALLOWED_METRICS)
        check(not unknown, f"{name}: {len(exprs)} queries use only Quarry's metric names {unknown or ''}")
        check(
            "quarry-consumer" in json.dumps(board) or "up" not in used,
            f"{name}: `up` is selected by job=\"quarry-consumer\"",
        )
        ids = [p["id"] for p in board.get("panels", [])]
        check(len(ids) == len(set(ids)), f"{name}: {len(ids)} panels with unique ids")

    section("deploy/prometheus/prometheus.yml")
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config.get("scrape_configs", [])}
    targets = {
        name: sorted(t for sc in job.get("static_configs", []) for t in sc.get("targets", []))
        for name, job in jobs.items()
    }
    check(targets.get("quarry-consumer") == ["127.0.0.1:9100", "127.0.0.1:9101"],
          "job quarry-consumer scrapes 127.0.0.1:9100 and 127.0.0.1:9101")
    check(targets.get("quarry-reporter") == ["127.0.0.1:8080"], "job quarry-reporter scrapes 127.0.0.1:8080")


# ---------------------------------------------------------------------------------------------


def lint(scenario: str, values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    infos = [m for m in report["messages"] if m["severity"] < 2]
    for message in problems:
        fail(f"helm lint ({scenario}): {message['path']}: {message['error'].strip()}")
    if not problems:
        ok(f"helm lint --strict --kube-version v{KUBE_VERSION} ({scenario})"
           + (f"; {len(infos)} info: " + "; ".join(m["error"] for m in infos) if infos else ""))


def expect_refusal(scenario: str, values: dict[str, Any], error_type: type, must_mention: list[str]) -> None:
    try:
        render(values)
    except error_type as error:
        text = str(error)
        missing = [m for m in must_mention if m not in text]
        first = text.strip().splitlines()
        if missing:
            fail(f"{scenario}: refused, but the error does not mention {missing}: {text[:400]}")
        else:
            ok(f"{scenario}: refused ({first[-1].strip() if first else type(error).__name__})")
        return
    except helm.HelmError as error:
        fail(f"{scenario}: refused with {type(error).__name__}, expected {error_type.__name__}: {str(error)[:300]}")
        return
    fail(f"{scenario}: rendered, but must be refused")


def main() -> int:
    print(f"helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), "
          f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes {KUBE_VERSION}")
    check_dashboards()

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    full = load_values("full-values.yaml")
    scenarios: list[tuple[str, dict[str, Any], Callable | None]] = [
        ("default values", {}, None),
        ("full-values", full, check_full),
        ("full-values, sandbox mode privileged", merge(full, {"consumer": {"sandbox": {"mode": "privileged"}}}), None),
        ("full-values, sandbox mode none", merge(full, {"consumer": {"sandbox": {"mode": "none"}}}), None),
        ("secrets.create (development)", {
            "config": {"s3": {"endpoint": "http://minio.quarry.svc:9000"}},
            "secrets": {"create": True, "values": {
                "databaseUrl": "postgres://quarry:dev@postgres:5432/quarry",
                "amqpUrl": "amqp://quarry:dev@rabbitmq:5672/%2f",
                "s3AccessKeyId": "quarry", "s3SecretAccessKey": "dev-secret"}}}, None),
    ]

    section("helm lint")
    for name, values, _ in scenarios:
        lint(name, values)

    for name, values, extra in scenarios:
        section(f"render: {name}")
        try:
            docs = render(values)
        except helm.HelmError as error:
            fail(f"{name}: render failed: {error}")
            continue
        kinds: dict[str, int] = {}
        for _, doc in docs:
            kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
        print("     " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        validate_manifests(name, docs)
        check_common(name, docs, merge(defaults, values))
        if extra:
            extra(docs, merge(defaults, values))

    section("values the chart must refuse")
    expect_refusal("helm/ci/bad-values.yaml", load_values("bad-values.yaml"), helm.HelmValuesError,
                   ["concurency", "/consumer/sandbox/mode", "/run/mode"])
    expect_refusal("an unknown top-level key", {"replicaCount": 3}, helm.HelmValuesError, ["replicaCount"])
    expect_refusal("a run name Quarry would refuse", {"run": {"name": "../etc"}}, helm.HelmValuesError, ["/run/name"])
    expect_refusal("three toolchains", {"run": {"toolchains": ["1.94.0", "1.95.0", "nightly"]}},
                   helm.HelmValuesError, ["/run/toolchains"])
    expect_refusal("a termination grace period shorter than the shutdown grace",
                   {"consumer": {"terminationGracePeriodSeconds": 600}}, helm.HelmError,
                   ["terminationGracePeriodSeconds"])
    expect_refusal("a shutdown grace shorter than the job time limit",
                   {"run": {"timeout": 3600}}, helm.HelmError, ["shutdownGraceSeconds"])
    expect_refusal("no S3 endpoint", {"config": {"s3": {"endpoint": ""}}}, helm.HelmError, ["config.s3.endpoint"])
    expect_refusal("a NetworkPolicy without the broker's address",
                   {"networkPolicy": {"enabled": True, "database": {"cidrs": ["10.0.0.0/24"]}}},
                   helm.HelmError, ["networkPolicy.broker"])
    expect_refusal("run.enabled without run.name", {"run": {"enabled": True}}, helm.HelmError, ["run.name"])

    print()
    if failures:
        print(f"helm/validate: {len(failures)} failure(s):")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print("helm/validate: everything passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
