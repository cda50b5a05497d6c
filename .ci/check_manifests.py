#!/usr/bin/env python3
"""Offline checks of Drover's deployment manifests (run by .ci/manifests).

    check_manifests.py k8s RENDERED.yaml...   schema validation + policy of rendered manifests
    check_manifests.py compose FILE.yml       the compose file against the compose-spec schema

Kubernetes' own kinds are validated, strictly (unknown fields fail), against the schemas the
`kubernetes-validate` package ships; the KEDA ScaledObject against its CRD schema vendored in
.ci/schemas (made strict the same way). A kind with no schema fails: nothing goes unchecked.

The policy every workload's containers must meet: liveness and readiness probes (a Job, which
serves nothing, gets an `activeDeadlineSeconds` instead), CPU and memory requests and limits,
non-root, a read-only root filesystem, no privilege escalation, every capability dropped, and
an image pinned to a tag other than `latest` (or a digest).
"""

import copy
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
# The oldest Kubernetes the manifests support.
KUBERNETES_VERSION = "1.30.0"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


def strict(schema):
    """A CRD's openAPIV3Schema with unknown fields refused, as the API server prunes them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schemas():
    with open(os.path.join(SCHEMAS, "keda.sh-scaledobject-v1alpha1.json")) as f:
        scaled_object = strict(json.load(f))
    return {("keda.sh/v1alpha1", "ScaledObject"): scaled_object}


def schema_errors(doc, crds):
    """Why `doc` does not match its kind's schema (empty: it does)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crds:
        validator = jsonschema.Draft7Validator(crds[key])
        return [
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "<root>"
        return [f"{path}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no schema to validate against: {e.message}"]
    return []


def pod_spec(doc):
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return spec.get("template", {}).get("spec", {})


def policy_violations(doc):
    """How the workload `doc` breaks the policy (empty: it does not, or is no workload)."""
    if doc.get("kind") not in WORKLOADS:
        return []
    kind = doc["kind"]
    is_job = kind in ("Job", "CronJob")
    pod = pod_spec(doc)
    pod_security = pod.get("securityContext", {})
    violations = []
    if is_job:
        job = doc["spec"] if kind == "Job" else doc["spec"]["jobTemplate"]["spec"]
        if "activeDeadlineSeconds" not in job:
            violations.append("a Job needs activeDeadlineSeconds (it gets no probes)")
    containers = [(c, False) for c in pod.get("containers", [])]
    containers += [(c, True) for c in pod.get("initContainers", [])]
    for container, init in containers:
        where = f"container {container.get('name')!r}"
        if not init and not is_job:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in container:
                    violations.append(f"{where}: no {probe}")
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(bound, {}):
                    violations.append(f"{where}: no {resource} in resources.{bound}")
        security = container.get("securityContext", {})
        if not security.get("runAsNonRoot", pod_security.get("runAsNonRoot", False)):
            violations.append(f"{where}: not runAsNonRoot")
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        if user == 0:
            violations.append(f"{where}: runAsUser 0")
        if security.get("readOnlyRootFilesystem") is not True:
            violations.append(f"{where}: root filesystem not read-only")
        if security.get("allowPrivilegeEscalation") is not False:
            violations.append(f"{where}: allowPrivilegeEscalation not false")
        if security.get("privileged"):
            violations.append(f"{where}: privileged")
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            violations.append(f"{where}: capabilities not all dropped")
        image = container.get("image", "")
        name = image.split("@", 1)[0]
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
        if "@" not in image and tag in (None, "latest"):
            violations.append(f"{where}: image {image!r} is not pinned (no tag, or :latest)")
    return [f"{kind}/{doc['metadata']['name']}: {v}" for v in violations]


def check_k8s(paths):
    crds = crd_schemas()
    failures = []
    count = 0
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if not docs:
            failures.append(f"{path}: no manifests")
        for doc in docs:
            count += 1
            name = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            failures += [f"{name}: {e}" for e in schema_errors(doc, crds)]
            failures += [f"{path}: {v}" for v in policy_violations(doc)]
    return count, failures


def check_compose(path):
    with open(os.path.join(SCHEMAS, "compose-spec.json")) as f:
        schema = json.load(f)
    with open(path) as f:
        doc = yaml.safe_load(f)
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{path}: {'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def main(argv):
    if len(argv) < 3 or argv[1] not in ("k8s", "compose"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "k8s":
        count, failures = check_k8s(argv[2:])
        what = f"{count} manifests valid (Kubernetes {KUBERNETES_VERSION}, strict) and within policy"
    else:
        failures = [f for path in argv[2:] for f in check_compose(path)]
        what = f"{', '.join(argv[2:])} valid against the compose-spec schema"
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        return 1
    print(what)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
