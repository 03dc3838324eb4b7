"""The compiled packages against what the KFP backend does with them. No backend runs here, so its
rules are encoded below, each with where it was read (kubeflow/pipelines at the tags named;
backend/src/v2 unless said otherwise):

1. Which backend version each feature of a package needs; the documented minimum (README,
   docs/cluster.md) must be the highest of them.
2. Resource placeholders, resolved as the driver resolves them: a pod's accelerator limit is set
   only when both placeholders resolve to non-empty strings.
3. dsl.OneOf outputs, resolved with every branch taken, under each rule a supported version applies.

The tables cover what the packages use; a field or feature they do not know fails the test, so a
new one must be looked up and classified before it ships.
"""

import re
from pathlib import Path

import pytest
import yaml

from pipelines import retraining, training

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"training": training.COMPILED, "retraining": retraining.COMPILED}
DOCS = (REPO / "README.md", REPO / "docs" / "cluster.md")
# The newest backend whose source these rules were read from.
NEWEST_READ = (2, 17, 0)


def V(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


# ---- 1. features and the version each needs ----

# Pipeline-spec features: (version, where it was read).
FEATURES = {
    "resource placeholder": (
        "2.4.0",
        "PR 11501; driver.go initPodSpecPatch resolves resources.accelerator.resourceType/resourceCount",
    ),
    "parameter OneOf": (
        "2.4.0",
        "PR 11196; resolve.go resolveUpstreamParameters, DagOutputParameterSpec.valueFromOneof",
    ),
    "artifact OneOf": (
        "2.17.0",
        "PR 13437 (issue 13436); resolve.go GetProducerTask took the last artifactSelector before",
    ),
    "job id placeholder": ("2.5.0", "PR 11599; {{$.pipeline_job_uuid}} resolved by the driver"),
    "retry of a root-DAG task": ("2.5.0", "PR 11673; argocompiler/container.go getTaskRetryStrategy"),
    "retry of a task inside a sub-DAG": (
        "2.14.0",
        "PR 11861; 2.5.0's argocompiler/container.go getTaskRetryPolicySpec reads root-DAG tasks only",
    ),
    "display name other than the task key": ("2.14.0", "PRs 11938, 12061; input resolution by task name"),
}

# Platform-spec fields (KubernetesExecutorConfig, kubernetes_platform/proto/kubernetes_executor_config
# .proto at each tag; the backend replaces the module with that local copy from 2.14.0 on). The API
# server and the compiler parse it with strict protojson (apiserver/template/v2_template.go,
# compiler/argocompiler/container.go): a field the backend's proto lacks fails the run.
PLATFORM_FIELDS = {
    "activeDeadlineSeconds": "2.1.0",
    "nodeSelector": "2.0.0",
    "nodeSelector.labels": "2.0.0",
    "tolerations": "2.1.0",
    "tolerations.key": "2.1.0",
    "tolerations.operator": "2.1.0",
    "tolerations.effect": "2.1.0",
    "emptyDirMounts": "2.3.0",  # PR 10913
    "emptyDirMounts.volumeName": "2.3.0",
    "emptyDirMounts.mountPath": "2.3.0",
    "emptyDirMounts.medium": "2.3.0",
    "emptyDirMounts.sizeLimit": "2.3.0",
    "secretAsVolume": "2.0.0",
    "secretAsVolume.mountPath": "2.0.0",
    "secretAsVolume.secretName": "2.0.0",
    "secretAsVolume.optional": "2.3.0",
    "secretAsVolume.secretNameParameter": "2.5.0",  # PR 11770
    "secretAsVolume.secretNameParameter.componentInputParameter": "2.5.0",
    "secretAsEnv": "2.0.0",
    "secretAsEnv.keyToEnv": "2.0.0",
    "secretAsEnv.keyToEnv.secretKey": "2.0.0",
    "secretAsEnv.keyToEnv.envVar": "2.0.0",
    "secretAsEnv.secretName": "2.0.0",
    "secretAsEnv.secretNameParameter": "2.5.0",
    "secretAsEnv.secretNameParameter.componentInputParameter": "2.5.0",
    # kfp-kubernetes >= 2.15 writes it on every secretAsEnv, even false (PR 12216).
    "secretAsEnv.optional": "2.15.0",
}
# Leaves whose keys are data (label names), not fields.
FREE_KEYS = {"nodeSelector.labels"}


def load(path: Path) -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    spec = next(d for d in docs if "root" in d)
    platform = next((d for d in docs if "platforms" in d), {})
    return spec, platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})


def dags(spec: dict) -> dict[str, dict]:
    return {"root": spec["root"], **{n: c for n, c in spec["components"].items() if "dag" in c}}


def task_paths(spec: dict) -> list[tuple[tuple[str, str], ...]]:
    """Every task as its path from the root: ((dag component, task key), ...)."""
    out = []

    def walk(dag_name: str, prefix: tuple) -> None:
        for key, task in dags(spec)[dag_name]["dag"]["tasks"].items():
            path = (*prefix, (dag_name, key))
            out.append(path)
            child = task["componentRef"]["name"]
            if "dag" in spec["components"][child]:
                walk(child, path)

    walk("root", ())
    return out


def the_task(spec: dict, step: tuple[str, str]) -> dict:
    return dags(spec)[step[0]]["dag"]["tasks"][step[1]]


def used_features(spec: dict, platform: dict) -> dict[str, set[str]]:
    """{feature or platform field: where the package uses it}."""
    used: dict[str, set[str]] = {}

    def use(feature: str, where: str) -> None:
        used.setdefault(feature, set()).add(where)

    for name, executor in spec["deploymentSpec"]["executors"].items():
        for key, value in _leaves(executor.get("container", {}).get("resources", {})):
            if "{{$.inputs.parameters[" in str(value):
                use("resource placeholder", f"{name}.{key}")
    for dag_name, comp in dags(spec).items():
        outputs = comp["dag"].get("outputs", {})
        for key, value in outputs.get("parameters", {}).items():
            if "valueFromOneof" in value:
                use("parameter OneOf", f"{dag_name}.{key}")
        for key, value in outputs.get("artifacts", {}).items():
            if len(value.get("artifactSelectors", [])) > 1:
                use("artifact OneOf", f"{dag_name}.{key}")
    for path in task_paths(spec):
        task, where = the_task(spec, path[-1]), "/".join(k for _, k in path)
        if "{{$.pipeline_job_uuid}}" in str(task.get("inputs", {})):
            use("job id placeholder", where)
        if "retryPolicy" in task:
            use("retry of a root-DAG task" if len(path) == 1 else "retry of a task inside a sub-DAG", where)
        if task["taskInfo"]["name"] != path[-1][1]:
            use("display name other than the task key", where)
    for name, config in platform.get("executors", {}).items():
        for key, _ in _leaves(config, free=FREE_KEYS):
            use(f"platform:{key}", name)
    return used


def _leaves(obj, prefix: str = "", free=frozenset()):
    """(dotted key, value) of every field of `obj`, lists flattened; under a `free` key only the key."""
    if isinstance(obj, dict) and prefix not in free:
        for key, value in obj.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path, value
            yield from _leaves(value, path, free)
    elif isinstance(obj, list):
        for item in obj:
            yield from _leaves(item, prefix, free)


def needed_version(used: dict[str, set[str]]) -> tuple[tuple[int, ...], list[str]]:
    """The lowest backend that has every feature used, and the features that set it."""
    versions = {}
    unknown = []
    for feature in used:
        if feature.startswith("platform:"):
            field = feature[len("platform:") :]
            if field not in PLATFORM_FIELDS:
                unknown.append(field)
                continue
            versions[feature] = V(PLATFORM_FIELDS[field])
        elif feature in FEATURES:
            versions[feature] = V(FEATURES[feature][0])
        else:
            unknown.append(feature)
    assert not unknown, (
        f"the package uses {unknown}, which this test does not know: read which backend version "
        "supports it (kubeflow/pipelines backend/src/v2, kubernetes_platform/proto) and add it to the tables"
    )
    need = max(versions.values())
    return need, sorted(f for f, v in versions.items() if v == need)


def documented_minimum() -> tuple[int, ...]:
    found = {}
    for doc in DOCS:
        hits = set(re.findall(r"KFP backend (\d+\.\d+\.\d+) or later", doc.read_text()))
        assert len(hits) == 1, (
            f"{doc} must state the minimum once as 'KFP backend X.Y.Z or later', found {hits}"
        )
        found[doc.name] = V(hits.pop())
    assert len(set(found.values())) == 1, f"README and docs/cluster.md disagree: {found}"
    return next(iter(found.values()))


@pytest.mark.parametrize("package", PACKAGES)
def test_the_documented_minimum_backend_is_what_the_package_needs(package):
    spec, platform = load(PACKAGES[package])
    used = used_features(spec, platform)
    need, why = needed_version(used)
    documented = documented_minimum()
    assert documented >= need, (
        f"{package} needs KFP backend {'.'.join(map(str, need))} (for {why}), but the docs promise "
        f"{'.'.join(map(str, documented))}"
    )
    assert documented <= need, (
        f"{package} needs only {'.'.join(map(str, need))}; the docs say {'.'.join(map(str, documented))}: "
        "lower them so users know the real range"
    )
    assert need <= NEWEST_READ


def test_the_floor_is_set_by_retries_inside_conditions_and_nothing_newer():
    spec, platform = load(training.COMPILED)
    need, why = needed_version(used_features(spec, platform))
    assert need == (2, 14, 0)
    assert "retry of a task inside a sub-DAG" in why
    used = used_features(spec, platform)
    # What used to raise it: an artifact OneOf (2.17.0) and secretAsEnv's `optional` (2.15.0).
    assert "artifact OneOf" not in used and "platform:secretAsEnv.optional" not in used


def test_the_feature_scan_sees_what_would_raise_the_floor(tmp_path):
    """The scan is not blind: an artifact OneOf and kfp-kubernetes' secretAsEnv raise the minimum."""
    from kfp import compiler, dsl, kubernetes

    @dsl.component(base_image="python:3.11")
    def make(out: dsl.Output[dsl.Model]):
        open(out.path, "w").write("x")

    @dsl.component(base_image="python:3.11")
    def use(model: dsl.Input[dsl.Model]):
        print(model.path)

    @dsl.pipeline
    def artifact_one_of(nodes: int = 1, secret: str = "s"):
        with dsl.If(nodes == 1):
            a = make()
        with dsl.Else():
            b = make()
        kubernetes.use_secret_as_env(
            use(model=dsl.OneOf(a.outputs["out"], b.outputs["out"])), secret, {"K": "K"}
        )

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(artifact_one_of, str(path))
    need, why = needed_version(used_features(*load(path)))
    assert need == (2, 17, 0) and why == ["artifact OneOf"]
    assert "platform:secretAsEnv.optional" in used_features(*load(path))


# ---- 2. resource placeholders, as the driver resolves them ----


def parameter_source(spec: dict, path: tuple, name: str, run_args: dict) -> tuple[str, object]:
    """(parameterType, value) of input parameter `name` of the task at `path`, followed up to the root
    parameter or constant it comes from, with the run's arguments over the root defaults."""
    task = the_task(spec, path[-1])
    source = task["inputs"]["parameters"][name]
    if "componentInputParameter" in source:
        upstream = source["componentInputParameter"]
        if len(path) == 1:
            definition = spec["root"]["inputDefinitions"]["parameters"][upstream]
            return definition["parameterType"], run_args.get(upstream, definition.get("defaultValue"))
        return parameter_source(spec, path[:-1], upstream, run_args)
    if "runtimeValue" in source:
        value = source["runtimeValue"]["constant"]
        kind = {str: "STRING", bool: "BOOLEAN", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE"}[type(value)]
        return kind, value
    raise AssertionError(
        f"{'/'.join(k for _, k in path)}.{name}: a source this test does not model: {source}"
    )


def driver_string_value(kind: str, value) -> str:
    """structpb Value.GetStringValue(): the text of a string value, "" for any other kind
    (resolve.go resolvePodSpecInputRuntimeParameter returns exactly that)."""
    return value if kind == "STRING" else ""


def resolved_limits(spec: dict, path: tuple, run_args: dict) -> dict[str, str]:
    """The accelerator limit initPodSpecPatch (driver.go) writes for the task at `path`: set only when
    type and count both resolve non-empty; the count must parse as a Kubernetes quantity."""
    task = the_task(spec, path[-1])
    comp = spec["components"][task["componentRef"]["name"]]
    container = spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]
    accelerator = container.get("resources", {}).get("accelerator")
    if not accelerator:
        return {}

    def resolve(field: str) -> str:
        text = accelerator.get(field, "")
        match = re.fullmatch(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", text)
        if not match:
            return text  # a constant is written verbatim
        return driver_string_value(*parameter_source(spec, path, match.group(1), run_args))

    kind, count = resolve("resourceType"), resolve("resourceCount")
    if not (kind and count):
        return {}
    assert re.fullmatch(r"\d+", count), f"{count!r} is not a device count the API server accepts"
    return {kind: count}


def accelerator_tasks(spec: dict) -> list[tuple]:
    return [
        p
        for p in task_paths(spec)
        if "accelerator"
        in spec["deploymentSpec"]["executors"]
        .get(spec["components"][the_task(spec, p[-1])["componentRef"]["name"]].get("executorLabel", ""), {})
        .get("container", {})
        .get("resources", {})
    ]


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize(
    "run_args", [{}, {"accelerator_count": "16", "accelerator_type": "huawei.com/Ascend910b"}]
)
def test_every_training_pod_gets_its_accelerator_limit(package, run_args):
    spec, _ = load(PACKAGES[package])
    tasks = accelerator_tasks(spec)
    assert len(tasks) == 2  # train/finetune in their pods (the launchers request none)
    want = {run_args.get("accelerator_type", "huawei.com/Ascend910"): run_args.get("accelerator_count", "8")}
    for path in tasks:
        assert resolved_limits(spec, path, run_args) == want, "/".join(k for _, k in path)
        for field in ("resourceType", "resourceCount"):
            name = re.search(r"\['([^']+)'\]", the_executor(spec, path)["resources"]["accelerator"][field])[1]
            assert parameter_source(spec, path, name, run_args)[0] == "STRING"


def the_executor(spec: dict, path: tuple) -> dict:
    comp = spec["components"][the_task(spec, path[-1])["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]


def test_a_number_parameter_would_lose_the_limit(tmp_path):
    """The rule bites: an int accelerator count, as the packages had it, resolves to no limit."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11")
    def step():
        pass

    @dsl.pipeline
    def numbers(accelerator_count: int = 8, accelerator_type: str = "huawei.com/Ascend910"):
        step().set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(numbers, str(path))
    spec, _ = load(path)
    (task,) = accelerator_tasks(spec)
    assert resolved_limits(spec, task, {}) == {}


# ---- 3. dsl.OneOf, every branch taken, under each supported version's rule ----

COMPLETE, CANCELED = "COMPLETE", "CANCELED"  # a condition branch not taken is published CANCELED


def pick_artifact(selectors: list[dict], states: dict[str, str], version: tuple) -> dict:
    """resolve.go GetProducerTask for a DAG output artifact."""
    if version < (2, 17, 0):
        return selectors[-1]  # the last selector, whichever branch ran
    for s in selectors:  # PR 13437: the branch whose DAG is COMPLETE or CACHED
        if states.get(s["producerSubtask"]) in (COMPLETE, "CACHED"):
            return s
    raise AssertionError("processing OneOf: No successful task found")


def pick_parameter(selectors: list[dict], states: dict[str, str], version: tuple) -> dict:
    """resolve.go GetProducerTask / 2.4.0's resolveUpstreamParameters for valueFromOneof: the first
    selector whose task is COMPLETE or CACHED."""
    assert version >= (2, 4, 0), "parameter OneOf needs 2.4.0"
    for s in selectors:
        if states.get(s["producerSubtask"]) in (COMPLETE, "CACHED"):
            return s
    raise AssertionError("processing OneOf: No successful task found")


def leaf_producer(spec: dict, dag_name: str, key: str, kind: str) -> str:
    """The container task a DAG output comes from, through single-selector DAG outputs."""
    out = dags(spec)[dag_name]["dag"]["outputs"][kind][key]
    sel = out["valueFromParameter"] if kind == "parameters" else out["artifactSelectors"][0]
    task = dags(spec)[dag_name]["dag"]["tasks"][sel["producerSubtask"]]
    child = task["componentRef"]["name"]
    if "dag" in spec["components"][child]:
        inner = sel["outputParameterKey"] if kind == "parameters" else sel["outputArtifactKey"]
        return leaf_producer(spec, child, inner, kind)
    return sel["producerSubtask"]


def supported_rule_versions() -> list[tuple]:
    """One version per rule in force between the documented minimum and the newest read."""
    floor = documented_minimum()
    return sorted({floor, *(v for v in [(2, 17, 0)] if floor <= v <= NEWEST_READ)})


@pytest.mark.parametrize("package", PACKAGES)
def test_every_branch_of_every_one_of_resolves_to_the_task_that_ran(package):
    spec, _ = load(PACKAGES[package])
    checked = 0
    for dag_name, comp in dags(spec).items():
        outputs = comp["dag"].get("outputs", {})
        cases = [
            ("parameters", key, out["valueFromOneof"]["parameterSelectors"], pick_parameter)
            for key, out in outputs.get("parameters", {}).items()
            if "valueFromOneof" in out
        ] + [
            ("artifacts", key, out["artifactSelectors"], pick_artifact)
            for key, out in outputs.get("artifacts", {}).items()
            if len(out.get("artifactSelectors", [])) > 1
        ]
        for kind, key, selectors, pick in cases:
            for taken in selectors:
                states = {s["producerSubtask"]: CANCELED for s in selectors}
                states[taken["producerSubtask"]] = COMPLETE
                ran = leaf_producer_of(spec, dag_name, taken, kind)
                for version in supported_rule_versions():
                    chosen = pick(selectors, states, version)
                    assert chosen == taken, (
                        f"{package}: {dag_name}.{key} with branch {taken['producerSubtask']} taken resolves "
                        f"to {chosen['producerSubtask']} on KFP {'.'.join(map(str, version))}"
                    )
                    assert leaf_producer_of(spec, dag_name, chosen, kind) == ran
                checked += 1
    # Two branches (in the pod, a TrainJob) per consumed training step: train (finetune's checkpoint
    # is not read downstream) in one package, the warm-start and from-pretrained challengers in the other.
    assert checked == {"training": 2, "retraining": 4}[package]


def leaf_producer_of(spec: dict, dag_name: str, selector: dict, kind: str) -> str:
    task = dags(spec)[dag_name]["dag"]["tasks"][selector["producerSubtask"]]
    child = task["componentRef"]["name"]
    inner = selector["outputParameterKey"] if kind == "parameters" else selector["outputArtifactKey"]
    return (
        leaf_producer(spec, child, inner, kind)
        if "dag" in spec["components"][child]
        else selector["producerSubtask"]
    )


def test_the_artifact_rule_of_older_backends_picks_the_wrong_branch(tmp_path):
    """The model can fail: before 2.17.0 an artifact OneOf resolves to its last branch even when the
    first one ran."""
    selectors = [{"producerSubtask": "condition-2"}, {"producerSubtask": "condition-3"}]
    states = {"condition-2": COMPLETE, "condition-3": CANCELED}
    assert pick_artifact(selectors, states, (2, 16, 1)) == selectors[1]
    assert pick_artifact(selectors, states, (2, 17, 0)) == selectors[0]
    assert pick_parameter(selectors, states, (2, 14, 0)) == selectors[0]
