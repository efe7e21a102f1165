"""Static checks of Prism's deployment files, run by .ci/deploy-check.sh.

No docker engine or Kubernetes cluster is needed or pretended: this reads the
files and checks what can be known from them.

- deploy/compose: the compose file parses and conforms to the Compose
  Specification's JSON schema (.ci/schemas/compose-spec.json); every file or
  directory a service bind-mounts, and every build context and Dockerfile,
  exists in the repository; named volumes and depends_on name what exists.
  (compose-spec.json is schema/compose-spec.json of the compose-spec/compose-spec
  repository at commit 170098ba07d9, Apache-2.0, kept as it is.)
- Prometheus: the config parses, job names are unique, every target is a
  compose service, and every file it names is on a volume compose mounts.
- Grafana: the provisioning files parse; the dashboard JSON parses, is loaded
  from where compose mounts it, its panels use the provisioned data source,
  and every `prism_*` metric it queries is one Prism exposes, as derived from
  the Rust sources that register them.
- OpenTelemetry collector: the config parses, its pipelines name defined
  components, it receives OTLP/gRPC on :4317, where every Prism process of
  compose sends its traces.
- deploy/kubernetes (beyond kubernetes-validate's schema check): the
  kustomization lists files that exist; workloads' selectors match their pod
  labels, Services and budgets select some workload; mounts name volumes,
  probes and Services name ports that exist; referenced ConfigMaps, Secrets
  and ServiceAccounts are defined (or are the documented exceptions); and a
  proxy's grace period covers its preStop sleep, drain timeout and snapshot
  save.

- Everywhere (Dockerfile CMD, compose, Kubernetes): every flag given to a
  `prism` subcommand and every PRISM_* variable set for it is one that
  subcommand defines in src/ (clap's `#[arg(long, env = …)]`).

Prints one line per failure and exits 1 if there is any.
"""

import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "deploy/compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
K8S_DIR = ROOT / "deploy/kubernetes"

failures = []


def fail(where, message):
    failures.append(f"{where.relative_to(ROOT) if isinstance(where, Path) else where}: {message}")


def load_yaml(path, many=False):
    try:
        with open(path) as file:
            return list(yaml.safe_load_all(file)) if many else yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as error:
        fail(path, f"does not parse: {error}")
        return None


# --- Prism's metric names, from the Rust sources --------------------------

UNIT_SUFFIX = {"Seconds": "_seconds", "Bytes": "_bytes"}
TYPE_SUFFIXES = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}


def split_args(text, start):
    """The top-level, comma-separated arguments of the call whose `(` is at
    text[start], and the index after its `)`."""
    args, depth, current, i, quote = [], 0, [], start + 1, None
    while i < len(text):
        c = text[i]
        if quote:
            current.append(c)
            if c == "\\":
                current.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c == '"':
            quote = c
            current.append(c)
        elif c in "([{<":
            depth += 1
            current.append(c)
        elif c in ")]}>" and depth > 0:
            depth -= 1
            current.append(c)
        elif c == ")":
            args.append("".join(current).strip())
            return [a for a in args if a], i + 1
        elif c == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
        else:
            current.append(c)
        i += 1
    raise ValueError("unbalanced call")


def metric_type_of(expression, source):
    """Counter, Gauge or Histogram: the type of a registered value, e.g.
    `revision`, `applies.clone()`, `store_metrics.flush.clone()`, found from
    its `let` or its struct field in the same file."""
    name = re.sub(r"\.clone\(\)$", "", expression).split(".")[-1]
    declaration = re.search(rf"let\s+{name}\b[^=]*=", source)
    if declaration:
        # The statement's text, to its `;` outside brackets (a type such as
        # `Family::<[(&str, &str); 1], Counter>` has one inside).
        depth, end = 0, declaration.end()
        while end < len(source) and not (source[end] == ";" and depth == 0):
            depth += source[end] in "([{" and 1 or source[end] in ")]}" and -1 or 0
            end += 1
        text = source[declaration.end() : end]
    else:
        field = re.search(rf"pub\s+{name}\s*:\s*([^\n]*)", source)
        text = field.group(1) if field else ""
    kinds = re.findall(r"\b(Counter|Gauge|Histogram)\b", text)
    return kinds[-1] if kinds else None


def defined_metrics(path):
    """The exposed names of every metric `path` registers with
    prometheus-client: the name (with the registry's prefix), its unit's
    suffix and its type's suffixes (OpenMetrics: `_total`, `_bucket`...)."""
    source = path.read_text()
    prefix = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', source)
    prefix = prefix.group(1) + "_" if prefix else ""
    found = []  # (name, unit, type)
    for match in re.finditer(r"\.(register|register_with_unit|encode_descriptor)\(", source):
        call = match.group(1)
        args, _ = split_args(source, match.end() - 1)
        literal = re.fullmatch(r'"([a-z_]+)"', args[0])
        if call == "encode_descriptor":
            unit = re.search(r"Unit::(\w+)", args[2])
            unit = unit.group(1) if unit else None
            kind = re.search(r"MetricType::(\w+)", args[3])
            kind = kind.group(1) if kind else None
            if literal:
                names = [literal.group(1)]
            else:
                # `for (name, help, …) in [("prism_…", …), …] { … encode_descriptor(name, …`
                loop = source.rfind("for (", 0, match.start())
                names = re.findall(r'\(\s*"(prism_[a-z_]+)"', source[loop : match.start()])
            for name in names:
                found.append((name, unit, kind))
        else:
            if not literal:
                fail(path, f"cannot read the metric name of `{call}({args[0]}, …)`")
                continue
            unit = None
            if call == "register_with_unit":
                unit = re.search(r"Unit::(\w+)", args[2]).group(1)
            found.append((prefix + literal.group(1), unit, metric_type_of(args[-1], source)))
    names = set()
    for name, unit, kind in found:
        if kind not in TYPE_SUFFIXES or (unit and unit not in UNIT_SUFFIX):
            fail(path, f"cannot tell the type or unit of metric {name} ({kind}, {unit})")
            continue
        base = name + (UNIT_SUFFIX[unit] if unit else "")
        names.update(base + suffix for suffix in TYPE_SUFFIXES[kind])
    return names


def prism_metrics():
    names = set()
    for crate in ("data-plane/src", "control-plane/src"):
        for path in sorted((ROOT / crate).rglob("*.rs")):
            text = path.read_text()
            if "prometheus_client" in text and re.search(r"\.(register|encode_descriptor)\(", text):
                names |= defined_metrics(path)
    if not any(n.startswith("prism_proxy_") for n in names) or not any(
        n.startswith("prism_control_plane_") for n in names
    ):
        fail("metrics", f"found too few metric definitions in the Rust sources: {sorted(names)}")
    return names


# --- Prism's flags and environment variables, from src/ --------------------


def block_after(source, start):
    """The text inside the braces that open at or after `start`."""
    open_at = source.index("{", start)
    depth = 0
    for i in range(open_at, len(source)):
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        if depth == 0:
            return source[open_at + 1 : i]
    raise ValueError("unbalanced braces")


def arg_fields(body, structs):
    """(flags, env names) of the clap fields in a struct or variant body,
    with those of `#[command(flatten)]` fields' structs."""
    flags, envs = set(), set()
    for match in re.finditer(r"#\[arg\(", body):
        attribute, end = split_args(body, match.end() - 1)
        field = re.match(r"(?:\s*(?:///[^\n]*|//[^\n]*|#\[[^\n]*\]))*\s*(?:pub\s+)?(\w+)\s*:", body[end + 1 :])
        if field is None:
            continue
        for part in attribute:
            long = re.fullmatch(r'long(?:\s*=\s*"([\w-]+)")?', part)
            if long:
                flags.add("--" + (long.group(1) or field.group(1).replace("_", "-")))
            env = re.fullmatch(r'env\s*=\s*"(\w+)"', part)
            if env:
                envs.add(env.group(1))
    for match in re.finditer(r"#\[command\(flatten\)\]\s*(?:pub\s+)?\w+\s*:\s*(\w+)", body):
        inner_flags, inner_envs = arg_fields(structs.get(match.group(1), ""), structs)
        flags |= inner_flags
        envs |= inner_envs
    return flags, envs


def prism_cli():
    """subcommand → (flags, env names), the global ones included."""
    source = "\n".join(path.read_text() for path in sorted((ROOT / "src").glob("*.rs")))
    structs = {m.group(1): block_after(source, m.end()) for m in re.finditer(r"pub struct (\w+)\s*(?=\{)", source)}
    global_flags, global_envs = arg_fields(structs.get("Cli", ""), structs)
    commands = {}
    enum = block_after(source, source.index("pub enum Command"))
    for match in re.finditer(r"^    (\w+)\s*(\{|,|\()", enum, re.MULTILINE):
        name = re.sub(r"(?<!^)([A-Z])", r"-\1", match.group(1)).lower()
        flags, envs = arg_fields(block_after(enum, match.start()), structs) if match.group(2) == "{" else (set(), set())
        commands[name] = (flags | global_flags, envs | global_envs)
    for needed in ("up", "control-plane", "proxy", "demo-upstream"):
        if needed not in commands or (needed != "demo-upstream" and len(commands[needed][0]) < 5):
            fail("src/cli.rs", f"could not read subcommand {needed}'s flags: {commands.get(needed)}")
    return commands


def check_invocation(cli, where, words, env):
    """`prism WORDS…` with environment ENV (names only matter): the
    subcommand exists and defines every flag and PRISM_* variable given."""
    if not words or words[0] not in cli:
        fail(where, f"`prism {' '.join(words[:1])}`: no such subcommand")
        return
    flags, envs = cli[words[0]]
    for word in words[1:]:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in flags:
            fail(where, f"`prism {words[0]}` has no flag {flag}")
    for name in env:
        if (name.startswith("PRISM_") or name == "OTEL_EXPORTER_OTLP_ENDPOINT") and name not in envs:
            fail(where, f"`prism {words[0]}` reads no variable {name}")


def check_dockerfile(cli):
    path = ROOT / "deploy/Dockerfile"
    text = re.sub(r"\\\n", " ", path.read_text())
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.MULTILINE)
    cmd = re.search(r"^CMD\s+(\[.*\])", text, re.MULTILINE)
    if not entrypoint or json.loads(entrypoint.group(1)) != ["prism"] or not cmd:
        fail(path, "expected ENTRYPOINT [\"prism\"] and a CMD in exec form")
        return
    check_invocation(cli, f"{path.relative_to(ROOT)}: CMD", json.loads(cmd.group(1)), {})


# --- compose -----------------------------------------------------------------


def bind_sources(service):
    """(source, target) of each bind mount of a compose service."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
            if source.startswith((".", "/", "~")):
                yield source, target
        elif volume.get("type") == "bind":
            yield volume["source"], volume["target"]


def named_volumes(service):
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) > 1 and not parts[0].startswith((".", "/", "~")):
                yield parts[0], parts[1]
        elif volume.get("type") == "volume":
            yield volume["source"], volume["target"]


def check_compose():
    compose = load_yaml(COMPOSE)
    if compose is None:
        return None
    schema = json.loads((ROOT / ".ci/schemas/compose-spec.json").read_text())
    for error in jsonschema.Draft7Validator(schema).iter_errors(compose):
        fail(COMPOSE, f"Compose Specification: {'.'.join(map(str, error.absolute_path))}: {error.message}")
    services = compose.get("services", {})
    declared = set(compose.get("volumes", {}) or {})
    for name, service in services.items():
        where = f"{COMPOSE.relative_to(ROOT)}: services.{name}"
        for source, _ in bind_sources(service):
            if not (COMPOSE_DIR / source).resolve().exists():
                fail(where, f"mounts {source}, which does not exist in the repository")
        for volume, _ in named_volumes(service):
            if volume not in declared:
                fail(where, f"mounts volume {volume}, not declared under volumes:")
        build = service.get("build")
        if build:
            context = COMPOSE_DIR / (build if isinstance(build, str) else build.get("context", "."))
            if not context.resolve().is_dir():
                fail(where, f"build context {context} does not exist")
            elif isinstance(build, dict) and not (context / build.get("dockerfile", "Dockerfile")).is_file():
                fail(where, f"Dockerfile {build.get('dockerfile')} does not exist in {context}")
        depends = service.get("depends_on", [])
        for other in depends if isinstance(depends, list) else depends.keys():
            if other not in services:
                fail(where, f"depends on {other}, no such service")
        if build and isinstance(service.get("command"), list):
            environment = service.get("environment", {})
            names = environment if isinstance(environment, dict) else [e.split("=")[0] for e in environment]
            check_invocation(CLI, where, [str(word) for word in service["command"]], names)
    return compose


def mounts_of(compose, service):
    """container path → host path (Path) or volume name (str)."""
    service = compose["services"][service]
    mounts = {target: COMPOSE_DIR / source for source, target in bind_sources(service)}
    mounts.update({target: volume for volume, target in named_volumes(service)})
    return mounts


def host_path(compose, service, container_path):
    """The repository file behind `container_path` in `service`, if it is on a
    bind mount; the volume name if on a named volume; None if on neither."""
    for target, source in sorted(mounts_of(compose, service).items(), key=lambda m: -len(m[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            if isinstance(source, str):
                return source
            return (source / container_path[len(target) :].lstrip("/")).resolve()
    return None


def service_using(compose, image_prefix):
    for name, service in compose["services"].items():
        if str(service.get("image", "")).startswith(image_prefix):
            return name
    return None


def check_prometheus(compose):
    name = service_using(compose, "prom/prometheus")
    if not name:
        fail(COMPOSE, "no Prometheus service")
        return
    path = host_path(compose, name, "/etc/prometheus/prometheus.yml")
    if not isinstance(path, Path):
        fail(COMPOSE, "Prometheus's /etc/prometheus/prometheus.yml is not a file of the repository")
        return
    config = load_yaml(path)
    if config is None:
        return
    jobs = [job.get("job_name") for job in config.get("scrape_configs", [])]
    if len(jobs) != len(set(jobs)) or None in jobs:
        fail(path, f"job names must be present and unique: {jobs}")
    for job in config.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            for target in static.get("targets", []):
                host = target.rsplit(":", 1)[0]
                if host not in compose["services"]:
                    fail(path, f"job {job.get('job_name')}: target {target} is no compose service")
        for key in ("ca_file", "cert_file", "key_file"):
            file = job.get("tls_config", {}).get(key)
            if file and host_path(compose, name, file) is None:
                fail(path, f"job {job.get('job_name')}: {key} {file} is on no volume of {name}")
    if {"prism-proxy", "prism-control-plane"} - set(jobs):
        fail(path, f"scrapes {jobs}; both planes (prism-proxy, prism-control-plane) expected")


def check_grafana(compose, metrics):
    name = service_using(compose, "grafana/grafana")
    if not name:
        fail(COMPOSE, "no Grafana service")
        return
    provisioning = host_path(compose, name, "/etc/grafana/provisioning")
    if not isinstance(provisioning, Path):
        fail(COMPOSE, "Grafana's /etc/grafana/provisioning is not a directory of the repository")
        return
    uids = set()
    for path in sorted((provisioning / "datasources").glob("*.y*ml")):
        for source in (load_yaml(path) or {}).get("datasources", []):
            uids.add(source.get("uid"))
    dashboards = []
    for path in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in (load_yaml(path) or {}).get("providers", []):
            folder = host_path(compose, name, provider.get("options", {}).get("path", ""))
            if not isinstance(folder, Path) or not folder.is_dir():
                fail(path, f"provider {provider.get('name')}: its path is no directory compose mounts")
                continue
            dashboards += sorted(folder.glob("*.json"))
    if not dashboards:
        fail(provisioning, "provisions no dashboard")
    for path in dashboards:
        try:
            dashboard = json.loads(path.read_text())
        except ValueError as error:
            fail(path, f"does not parse: {error}")
            continue
        queries = []
        panels = list(dashboard.get("panels", []))
        while panels:
            panel = panels.pop()
            panels += panel.get("panels", [])
            for target in panel.get("targets", []):
                for datasource in (panel.get("datasource"), target.get("datasource")):
                    if datasource and datasource.get("uid") not in uids:
                        fail(path, f"panel {panel.get('title')!r}: data source {datasource} is not provisioned")
                if target.get("expr"):
                    queries.append((panel.get("title"), target["expr"]))
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            if query:
                queries.append((f"variable {variable.get('name')}", query))
        used = set()
        for title, query in queries:
            for metric in re.findall(r"\bprism_[a-z0-9_]+", query):
                used.add(metric)
                if metric not in metrics:
                    fail(path, f"{title!r} queries {metric}, which Prism does not define")
        if len(queries) < 10 or not used:
            fail(path, f"only {len(queries)} queries, of {len(used)} Prism metrics")
        print(f"  {path.relative_to(ROOT)}: {len(queries)} queries over {len(used)} of Prism's {len(metrics)} metric names")


def check_collector(compose):
    name = service_using(compose, "otel/opentelemetry-collector")
    if not name:
        fail(COMPOSE, "no OpenTelemetry collector service")
        return
    command = " ".join(compose["services"][name].get("command", []))
    config_path = re.search(r"--config[= ](\S+)", command)
    path = host_path(compose, name, config_path.group(1) if config_path else "/etc/otelcol-contrib/config.yaml")
    if not isinstance(path, Path):
        fail(COMPOSE, "the collector's config is not a file of the repository")
        return
    config = load_yaml(path)
    if config is None:
        return
    for pipeline, spec in config.get("service", {}).get("pipelines", {}).items():
        for kind in ("receivers", "processors", "exporters"):
            for component in spec.get(kind, []):
                if component not in (config.get(kind) or {}):
                    fail(path, f"pipeline {pipeline} names {kind[:-1]} {component}, not defined")
    grpc = ((config.get("receivers") or {}).get("otlp") or {}).get("protocols", {}).get("grpc") or {}
    if not str(grpc.get("endpoint", "")).endswith(":4317"):
        fail(path, "no OTLP/gRPC receiver on :4317")
    # Every Prism process but the demo upstream points at it.
    for service_name, service in compose["services"].items():
        command = service.get("command", [])
        if isinstance(command, list) and command and command[0] in ("control-plane", "proxy", "up"):
            if f"--otlp-endpoint=http://{name}:4317" not in command:
                fail(COMPOSE, f"services.{service_name}: no --otlp-endpoint=http://{name}:4317")


# --- Kubernetes --------------------------------------------------------------

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
# Defined outside these manifests: the admin certificate the operator
# creates first (README "Deployment"), and the CA every namespace gets.
EXTERNAL = {("Secret", "prism-admin-tls"), ("ConfigMap", "kube-root-ca.crt")}


def seconds(duration):
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)] if match else None


def check_kubernetes():
    kustomization_path = K8S_DIR / "kustomization.yaml"
    kustomization = load_yaml(kustomization_path) or {}
    for resource in kustomization.get("resources", []):
        if not (K8S_DIR / resource).exists():
            fail(kustomization_path, f"lists {resource}, which does not exist")
    objects = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path != kustomization_path:
            objects += [(path, doc) for doc in load_yaml(path, many=True) or [] if doc]
    defined = {(doc["kind"], doc["metadata"]["name"]) for _, doc in objects}
    workloads = [(path, doc) for path, doc in objects if doc["kind"] in WORKLOADS]

    def selects(selector, labels):
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    for path, doc in workloads:
        where = f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}"
        pod = doc["spec"]["template"]
        if not selects(doc["spec"]["selector"]["matchLabels"], pod["metadata"].get("labels", {})):
            fail(where, "its selector does not match its pod template's labels")
        spec = pod["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for volume in spec.get("volumes", []):
            for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if key in volume:
                    ref = volume[key].get("name") or volume[key].get("secretName")
                    if (kind, ref) not in defined | EXTERNAL:
                        fail(where, f"volume {volume['name']} uses {kind} {ref}, defined nowhere")
            for source in volume.get("projected", {}).get("sources", []):
                if "configMap" in source and ("ConfigMap", source["configMap"]["name"]) not in defined | EXTERNAL:
                    fail(where, f"volume {volume['name']} uses ConfigMap {source['configMap']['name']}")
        account = spec.get("serviceAccountName")
        if account and ("ServiceAccount", account) not in defined:
            fail(where, f"uses ServiceAccount {account}, defined nowhere")
        for container in spec.get("initContainers", []) + spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
            for port in ports:
                if len(port) > 15:
                    fail(where, f"container {container['name']}: port name {port} is over 15 characters")
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    fail(where, f"container {container['name']} mounts {mount['name']}, no such volume")
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(probe_name, {})
                for action in ("httpGet", "tcpSocket", "grpc"):
                    port = probe.get(action, {}).get("port")
                    if isinstance(port, str) and port not in ports:
                        fail(where, f"container {container['name']}: {probe_name} port {port} is not a named port")
                    if isinstance(port, int) and port not in ports.values():
                        fail(where, f"container {container['name']}: {probe_name} port {port} is not a container port")
        for container in spec["containers"]:
            if not re.match(r"(.*/)?prism(:|$)", container["image"]):
                continue
            words = container.get("args", [])
            script = " ".join(container.get("command", []))
            if "exec prism " in script:
                words = script.split("exec prism ", 1)[1].split() + words
            env = {e["name"] for e in container.get("env", [])}
            if "/etc/prism/topology/env" in script:
                # What the topology ConfigMap's script writes there.
                for _, doc in objects:
                    if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "prism-proxy-topology":
                        env |= set(re.findall(r"PRISM_[A-Z_]+", "".join(doc["data"].values())))
            check_invocation(CLI, f"{where}: container {container['name']}", words, env)
        # The drain adds up: preStop sleep + --drain-timeout + the snapshot
        # save (bounded at 5 s, prism_data_plane::DEFAULT_DRAIN_TIMEOUT's
        # comment) must fit in the grace period.
        for container in spec["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            command = " ".join(container.get("command", []) + container.get("args", []))
            if "prism proxy" not in command and "proxy" not in container.get("args", [])[:1]:
                continue
            drain = seconds(env.get("PRISM_DRAIN_TIMEOUT") or "20s")
            stop = container.get("lifecycle", {}).get("preStop", {})
            sleep = stop.get("sleep", {}).get("seconds")
            exec_command = stop.get("exec", {}).get("command", [])
            if sleep is None and exec_command[:1] == ["sleep"]:
                sleep = float(exec_command[1])
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if sleep is None:
                fail(where, "the proxy has no preStop sleep: endpoints may still send it connections as it drains")
            elif sleep + drain + 5 > grace:
                fail(where, f"preStop {sleep:g} s + drain {drain:g} s + 5 s save > grace period {grace} s")

    for path, doc in objects:
        where = f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "Service" and doc["spec"].get("selector"):
            pods = [w for _, w in workloads if selects(doc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
            if not pods:
                fail(where, "selects no workload's pods")
            for port in doc["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                for workload in pods:
                    names = {
                        p.get("name"): p["containerPort"]
                        for c in workload["spec"]["template"]["spec"]["containers"]
                        for p in c.get("ports", [])
                    }
                    if target not in (names if isinstance(target, str) else names.values()):
                        fail(where, f"port {port.get('name')}: target {target} is not a port of {workload['metadata']['name']}")
        if doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
            if not any(selects(selector, w["spec"]["template"]["metadata"]["labels"]) for _, w in workloads):
                fail(where, "selects no workload's pods")
        if doc["kind"] == "ClusterRoleBinding":
            for subject in doc.get("subjects", []):
                if subject["kind"] == "ServiceAccount" and ("ServiceAccount", subject["name"]) not in defined:
                    fail(where, f"binds ServiceAccount {subject['name']}, defined nowhere")
            if ("ClusterRole", doc["roleRef"]["name"]) not in defined:
                fail(where, f"binds ClusterRole {doc['roleRef']['name']}, defined nowhere")
    print(f"  deploy/kubernetes: {len(objects)} objects cross-checked")


CLI = {}


def main():
    CLI.update(prism_cli())
    check_dockerfile(CLI)
    metrics = prism_metrics()
    compose = check_compose()
    if compose:
        check_prometheus(compose)
        check_grafana(compose, metrics)
        check_collector(compose)
    check_kubernetes()
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        print(f"deploy-check: {len(failures)} failure(s)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
