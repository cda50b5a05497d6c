#!/usr/bin/env python3
"""Unit cases of check_manifests.py: a sound workload passes, and each thing the policy
forbids (no probes first) or the schemas refuse makes it fail. Run: python3 -m unittest
discover -s .ci -p 'test_*.py'."""

import copy
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import check_manifests  # noqa: E402

SOUND = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "demo"},
    "spec": {
        "selector": {"matchLabels": {"app": "demo"}},
        "template": {
            "metadata": {"labels": {"app": "demo"}},
            "spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                "containers": [
                    {
                        "name": "demo",
                        "image": "example.org/demo:1.2.3",
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 9090}},
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9090}},
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "64Mi"},
                            "limits": {"cpu": "1", "memory": "256Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        },
    },
}


def container(doc):
    return doc["spec"]["template"]["spec"]["containers"][0]


class Policy(unittest.TestCase):
    def test_a_sound_deployment_passes_schema_and_policy(self):
        self.assertEqual(check_manifests.policy_violations(SOUND), [])
        self.assertEqual(check_manifests.schema_errors(SOUND, check_manifests.crd_schemas()), [])

    def test_a_deployment_without_probes_fails(self):
        doc = copy.deepcopy(SOUND)
        del container(doc)["livenessProbe"]
        del container(doc)["readinessProbe"]
        self.assertEqual(
            check_manifests.policy_violations(doc),
            [
                "Deployment/demo: container 'demo': no livenessProbe",
                "Deployment/demo: container 'demo': no readinessProbe",
            ],
        )

    def test_a_latest_or_untagged_image_fails(self):
        for image in ("example.org/demo:latest", "example.org:5000/demo", "demo"):
            doc = copy.deepcopy(SOUND)
            container(doc)["image"] = image
            self.assertEqual(len(check_manifests.policy_violations(doc)), 1, image)
        doc = copy.deepcopy(SOUND)
        container(doc)["image"] = "example.org:5000/demo@sha256:" + "0" * 64
        self.assertEqual(check_manifests.policy_violations(doc), [])

    def test_root_a_writable_root_and_missing_limits_fail(self):
        doc = copy.deepcopy(SOUND)
        del doc["spec"]["template"]["spec"]["securityContext"]
        del container(doc)["securityContext"]["readOnlyRootFilesystem"]
        del container(doc)["resources"]["limits"]["memory"]
        violations = check_manifests.policy_violations(doc)
        self.assertIn("Deployment/demo: container 'demo': not runAsNonRoot", violations)
        self.assertIn("Deployment/demo: container 'demo': root filesystem not read-only", violations)
        self.assertIn("Deployment/demo: container 'demo': no memory in resources.limits", violations)

    def test_a_job_needs_a_deadline_instead_of_probes(self):
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once"},
            "spec": {"template": copy.deepcopy(SOUND["spec"]["template"])},
        }
        self.assertEqual(
            check_manifests.policy_violations(job),
            ["Job/once: a Job needs activeDeadlineSeconds (it gets no probes)"],
        )
        job["spec"]["activeDeadlineSeconds"] = 60
        self.assertEqual(check_manifests.policy_violations(job), [])


class Schemas(unittest.TestCase):
    def test_an_unknown_field_fails_validation(self):
        doc = copy.deepcopy(SOUND)
        container(doc)["livenesProbe"] = {}
        self.assertNotEqual(check_manifests.schema_errors(doc, check_manifests.crd_schemas()), [])

    def test_a_scaled_object_is_validated_against_the_vendored_crd(self):
        crds = check_manifests.crd_schemas()
        scaled = {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": "w"},
            "spec": {
                "scaleTargetRef": {"name": "w"},
                "triggers": [{"type": "nats-jetstream", "metadata": {"stream": "S"}}],
            },
        }
        self.assertEqual(check_manifests.schema_errors(scaled, crds), [])
        scaled["spec"]["maxReplicas"] = 3
        self.assertNotEqual(check_manifests.schema_errors(scaled, crds), [])
        del scaled["spec"]["maxReplicas"]
        del scaled["spec"]["triggers"]
        self.assertNotEqual(check_manifests.schema_errors(scaled, crds), [])

    def test_a_kind_without_schema_fails(self):
        doc = {"apiVersion": "example.org/v1", "kind": "Widget", "metadata": {"name": "x"}}
        self.assertNotEqual(check_manifests.schema_errors(doc, check_manifests.crd_schemas()), [])

    def test_a_compose_file_with_an_unknown_key_fails(self):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
            f.write("services:\n  a:\n    image: x:1\n    helthcheck: {}\n")
        try:
            self.assertNotEqual(check_manifests.check_compose(f.name), [])
        finally:
            os.unlink(f.name)


if __name__ == "__main__":
    unittest.main()
