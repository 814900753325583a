"""Validates Kubernetes manifests for shmback: the Kubernetes schemas (PyPI kubernetes-validate,
strict: unknown fields are errors) and the rules a shmback pod must follow.

    python3 validate-k8s.py FILE...                 every file must pass
    python3 validate-k8s.py --expect-fail FILE...   every file must fail with an error containing
                                                    the text of its `# expect: TEXT` line
    --context FILE (repeatable, before the files): read FILE's Secrets too, check nothing in it

All files of one run are read together, so a Secret in one file satisfies a reference in another.
Exit status 0 when every file did what was expected, 1 otherwise.
"""

import re
import sys

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33.0"  # native sidecars (initContainers with restartPolicy: Always) are GA
RESTIC_VARIABLES = {
    "RESTIC_REPOSITORY", "RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_ACCESS_TOKEN", "GOOGLE_PROJECT_ID",
    "AZURE_ACCOUNT_NAME", "AZURE_ACCOUNT_KEY", "AZURE_ACCOUNT_SAS", "B2_ACCOUNT_ID", "B2_ACCOUNT_KEY",
    "OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_PROJECT_NAME", "OS_USER_DOMAIN_NAME",
    "OS_PROJECT_DOMAIN_NAME", "OS_REGION_NAME", "OS_STORAGE_URL", "OS_AUTH_TOKEN",
}


def pod_specs(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        yield spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        yield (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}


def words(container):
    return " ".join(str(w) for w in (container.get("command") or []) + (container.get("args") or []))


def runs_uploader(container):
    text = words(container)
    return bool(re.search(r"(^|[\s/])shmback\s+run\b", text) or (
        "shmback" in str(container.get("image", "")) and re.match(r"run\b", " ".join(map(str, container.get("args") or [])))
        and not container.get("command")))


def metrics_port(container, text):
    """The port of the uploader's --metrics-addr (or SHMBACK_METRICS_ADDR), if it serves one."""
    m = re.search(r"--metrics-addr[ =]+\S*:([0-9]+)", text)
    if m:
        return int(m.group(1))
    for e in container.get("env") or []:
        if e.get("name") == "SHMBACK_METRICS_ADDR" and re.search(r":([0-9]+)$", str(e.get("value", ""))):
            return int(str(e["value"]).rsplit(":", 1)[1])
    return None


def probe_rules(cname, container, text):
    """Port probes of the uploader must reach its metrics port: /healthz or /readyz over HTTP."""
    errors = []
    served = metrics_port(container, text)
    named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or [] if p.get("name")}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = container.get(probe) or {}
        if "grpc" in p:
            errors.append(f"{cname}: {probe} uses gRPC; the uploader serves no gRPC health endpoint (httpGet /healthz or /readyz)")
        for kind in ("httpGet", "tcpSocket"):
            if kind not in p:
                continue
            port = p[kind].get("port")
            port = named.get(port, port)
            if served is None or port != served:
                errors.append(
                    f"{cname}: {probe} probes port {port}, where the uploader serves no health endpoint "
                    f"(give it --metrics-addr 0.0.0.0:PORT and probe /healthz or /readyz on PORT)")
            elif kind == "httpGet" and p[kind].get("path") not in ("/healthz", "/readyz"):
                errors.append(f"{cname}: {probe} gets {p[kind].get('path')}; the metrics port answers /healthz (alive) and /readyz (ready)")
    return errors


def pod_rules(name, spec, secrets):
    errors = []
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        errors.append(f"{name}: pod securityContext.runAsNonRoot must be true")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    containers = [("initContainers", c) for c in spec.get("initContainers") or []] + \
                 [("containers", c) for c in spec.get("containers") or []]
    for where, c in containers:
        cname = f"{name}: {where} {c.get('name')}"
        sc = c.get("securityContext") or {}
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            errors.append(f"{cname}: seccompProfile must be RuntimeDefault (pod or container)")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{cname}: securityContext.allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{cname}: securityContext.readOnlyRootFilesystem must be true")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            errors.append(f"{cname}: securityContext.capabilities.drop must include ALL")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            errors.append(f"{cname}: runs as uid 0")
        if not runs_uploader(c):
            continue
        text = words(c)
        errors += probe_rules(cname, c, text)
        supervised = re.search(r"\s--\s", f" {text} ")
        if where == "initContainers" and not supervised and c.get("restartPolicy") != "Always":
            errors.append(f"{cname}: a long-running `shmback run` in initContainers needs restartPolicy: Always (a native sidecar), or it blocks the pod's start")
        mounts = {m.get("mountPath", "").rstrip("/"): m.get("name") for m in c.get("volumeMounts") or []}
        for seg in re.findall(r"--segment[ =]+(\S+)", text) or (["/dev/shm/shmback"] if "--listen" not in text else []):
            d = seg.rsplit("/", 1)[0] or "/"
            vol = volumes.get(mounts.get(d))
            ed = (vol or {}).get("emptyDir")
            if ed is None or ed.get("medium") != "Memory":
                errors.append(f"{cname}: segment {seg} needs an emptyDir {{medium: Memory}} mounted at {d}")
            elif not ed.get("sizeLimit"):
                errors.append(f"{cname}: the memory emptyDir at {d} needs a sizeLimit (it counts against the pod's memory)")
        for ref in c.get("envFrom") or []:
            sname = (ref.get("secretRef") or {}).get("name")
            if sname is None:
                continue
            if sname not in secrets:
                errors.append(f"{cname}: Secret {sname} is not among the manifests")
                continue
            keys = set(secrets[sname])
            unknown = sorted(keys - RESTIC_VARIABLES)
            if unknown:
                errors.append(f"{cname}: Secret {sname} has keys restic does not read: {', '.join(unknown)}")
            if "RESTIC_REPOSITORY" not in keys or not keys & {"RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND"}:
                errors.append(f"{cname}: Secret {sname} needs RESTIC_REPOSITORY and one of RESTIC_PASSWORD(_FILE|_COMMAND)")
    return errors


def load(path):
    with open(path) as f:
        text = f.read()
    return text, [d for d in yaml.safe_load_all(text) if d]


def check(path, docs, secrets):
    errors = []
    for doc in docs:
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"schema: {name}: {e.message} at {'.'.join(map(str, e.path))}")
        except kubernetes_validate.utils.SchemaNotFoundError as e:  # an unknown kind or apiVersion
            errors.append(f"schema: {name}: {e}")
        for spec in pod_specs(doc):
            errors += [f"rule: {e}" for e in pod_rules(name, spec, secrets)]
    return errors


def main(argv):
    context = []
    while len(argv) >= 2 and argv[0] == "--context":
        context.append(argv[1])
        argv = argv[2:]
    expect_fail = bool(argv) and argv[0] == "--expect-fail"
    files = argv[1:] if expect_fail else argv
    if not files:
        print(__doc__, file=sys.stderr)
        return 2
    loaded = {f: load(f) for f in files}
    shared = {}
    for _, docs in list(loaded.values()) + [load(f) for f in context]:
        for d in docs:
            if d.get("kind") == "Secret":
                shared[d["metadata"]["name"]] = list((d.get("stringData") or {}).keys()) + list((d.get("data") or {}).keys())
    passed = failed = 0
    for f, (text, docs) in loaded.items():
        # A bad sample is judged alone, except for the Secrets of the good manifests.
        errors = check(f, docs, shared)
        if not expect_fail:
            if errors:
                failed += 1
                print(f"FAIL  {f}\n" + "\n".join(f"      {e}" for e in errors))
            else:
                passed += 1
                print(f"ok    {f}")
            continue
        m = re.search(r"^# expect: (.+)$", text, re.M)
        hit = [e for e in errors if m and m.group(1).strip() in e]
        if hit:
            passed += 1
            print(f"ok    {f} refused: {hit[0]}")
        else:
            failed += 1
            print(f"FAIL  {f}: expected an error containing {m.group(1).strip() if m else '(no # expect: line)'!r}, got {errors or 'none'}")
    print(f"k8s: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
