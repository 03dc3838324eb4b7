"""Run parameters of the compiled pipeline: parse `--param k=v` by the pipeline's declared types,
check them, and convert cron schedules, all before anything reaches the KFP API.

Errors are `ParameterError`, whose message names the parameter and what is wrong with it.
"""

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from cascade_rcnn.errors import CascadeRCNNError
from cascade_rcnn.registry import MODEL_NAME_PATTERN

# An accelerator step is one pod; Ascend forms collective groups of 1, 2, 4 or 8 NPUs (an HCCS ring
# or a whole 8-chip server), and 16-chip nodes (A3) take multiples of 8.
_SMALL_GROUPS = (1, 2, 4)
# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting and ending alphanumeric.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

_CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,#-]+$")
CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")


class ParameterError(CascadeRCNNError, ValueError):
    """A run parameter, pipeline root or schedule is invalid; nothing was submitted."""


def valid_accelerator_count(n: int) -> bool:
    return n in _SMALL_GROUPS or (n >= 8 and n % 8 == 0)


def check_s3_root(name: str, uri: str) -> str:
    """`uri` must be s3://bucket[/prefix] with a valid bucket name (the steps run in pods, where a local
    path would vanish with the pod). Returns the bucket."""
    if not isinstance(uri, str) or not uri:
        raise ParameterError(
            f"{name} is missing: give an object-store root such as s3://my-bucket/cascade-rcnn"
        )
    if not uri.startswith("s3://"):
        raise ParameterError(
            f"{name}={uri!r} is not an s3:// URI: the steps run in pods and need object storage"
        )
    bucket = uri[len("s3://") :].split("/", 1)[0]
    if not bucket:
        raise ParameterError(f"{name}={uri!r} has no bucket: write s3://BUCKET/prefix")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ParameterError(
            f"{name}={uri!r}: {bucket!r} is not a valid S3 bucket name "
            "(3-63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit)"
        )
    return bucket


def pipeline_inputs(package: Union[str, Path]) -> dict[str, dict]:
    """{name: {"parameterType": ..., "defaultValue"?: ...}} of a compiled pipeline's root inputs."""
    with open(package) as f:
        spec = next(d for d in yaml.safe_load_all(f) if d and "root" in d)
    return dict(spec["root"].get("inputDefinitions", {}).get("parameters", {}))


def _convert(name: str, raw: str, ptype: str) -> Any:
    try:
        if ptype == "STRING":
            return raw
        if ptype == "NUMBER_INTEGER":
            return int(raw)
        if ptype == "NUMBER_DOUBLE":
            return float(raw)
        if ptype == "BOOLEAN":
            low = raw.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if ptype in ("LIST", "STRUCT"):
            value = json.loads(raw)
            want = list if ptype == "LIST" else dict
            if not isinstance(value, want):
                raise ValueError(f"expected a JSON {want.__name__}")
            return value
    except ValueError as e:
        raise ParameterError(f"--param {name}={raw!r}: not a valid {ptype.lower()} ({e})") from None
    raise ParameterError(f"--param {name}: parameter type {ptype} is not supported here")


def parse_params(pairs: list[str], inputs: Mapping[str, dict]) -> dict[str, Any]:
    """["k=v", ...] -> {k: value typed as the pipeline declares}; unknown names are errors. Lists and
    dicts are JSON: --param 'config_opts=["SOLVER.CHECKPOINT_PERIOD", "2000"]'."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ParameterError(f"--param {pair!r}: write NAME=VALUE")
        if name not in inputs:
            raise ParameterError(
                f"--param {name}: the pipeline has no such parameter (it has: {', '.join(sorted(inputs))})"
            )
        params[name] = _convert(name, raw, inputs[name]["parameterType"])
    return params


def _with_defaults(params: Mapping[str, Any], inputs: Mapping[str, dict]) -> dict[str, Any]:
    merged = {k: v["defaultValue"] for k, v in inputs.items() if "defaultValue" in v}
    merged.update(params)
    # The YAML stores integer defaults as floats (8.0).
    for k, v in inputs.items():
        if v["parameterType"] == "NUMBER_INTEGER" and isinstance(merged.get(k), float):
            merged[k] = int(merged[k])
    return merged


def check_params(params: Mapping[str, Any], inputs: Mapping[str, dict]) -> dict[str, Any]:
    """Every required parameter given, and the values the steps would reject late (after hours of
    queueing for accelerators) rejected now. Returns the parameters merged with the defaults."""
    merged = _with_defaults(params, inputs)
    missing = [k for k in inputs if k not in merged]
    if missing:
        raise ParameterError(f"missing required parameter(s): {', '.join(missing)} (pass --param NAME=VALUE)")
    problems: list[str] = []

    def check(cond: bool, message: str) -> None:
        if not cond:
            problems.append(message)

    if "root" in merged:
        try:
            check_s3_root("root", merged["root"])
        except ParameterError as e:
            problems.append(str(e))
    if "accelerator_count" in merged:
        n = merged["accelerator_count"]
        if isinstance(n, int) and not isinstance(n, bool):
            # A STRING parameter (the backend fills pod resources only from strings); ints are written out.
            n = merged["accelerator_count"] = str(n)
        check(
            isinstance(n, str) and n.isdigit() and valid_accelerator_count(int(n)),
            f"accelerator_count={n!r} is not a valid NPU group: write 1, 2, 4, 8 or a multiple of 8, "
            "in digits only",
        )
    if "nodes" in merged:
        check(
            isinstance(merged["nodes"], int) and merged["nodes"] >= 1,
            f"nodes={merged['nodes']!r} must be at least 1 (more than 1 runs training as a Kubeflow Trainer TrainJob)",
        )
    for name in ("iterations", "finetune_iterations", "warm_start_iterations", "batch_per_device"):
        if name in merged:
            check(merged[name] >= 1, f"{name}={merged[name]!r} must be at least 1")
    for name in ("learning_rate", "finetune_learning_rate", "warm_start_learning_rate"):
        if name in merged:
            check(merged[name] > 0, f"{name}={merged[name]!r} must be positive")
    for name in ("max_images", "eval_max_images"):
        if name in merged:
            check(merged[name] >= 0, f"{name}={merged[name]!r} must be 0 (all) or positive")
    for name in ("config_opts", "finetune_opts"):
        if name in merged:
            check(
                len(merged[name]) % 2 == 0,
                f"{name} needs KEY, VALUE pairs; got {len(merged[name])} items: {merged[name]!r}",
            )
    if "accelerator_type" in merged:
        check(
            bool(merged["accelerator_type"]),
            "accelerator_type is empty: give the device plugin's resource name",
        )
    if merged.get("finetune_data"):
        check(
            str(merged["finetune_data"]).startswith("s3://"),
            f"finetune_data={merged['finetune_data']!r} must be an s3:// URI (or empty for the ingested data)",
        )
    if "splits" in merged:
        check(bool(merged["splits"]), "splits is empty: name at least the training split")
    for name in ("train_split", "eval_split"):
        if name in merged:
            check(bool(merged[name]), f"{name} is empty: name a split of the data set")
    if merged.get("static_canvas"):
        canvas = merged["static_canvas"]
        ok = all(
            isinstance(c, list)
            and len(c) == 2
            and all(isinstance(v, int) and v > 0 and v % 32 == 0 for v in c)
            for c in canvas
        )
        check(
            ok,
            f"static_canvas={canvas!r}: give [height, width] pairs, each a positive multiple of 32, "
            "e.g. [[800, 1344], [1344, 800]]",
        )
    if "min_improvement" in merged:
        value = merged["min_improvement"]
        check(
            isinstance(value, (int, float)) and value >= 0,
            f"min_improvement={value!r} must be 0 or more (AP points)",
        )
    if "metric" in merged:
        task, _, key = str(merged["metric"]).partition("/")
        check(
            task in ("bbox", "segm") and bool(key),
            f"metric={merged['metric']!r}: use bbox/NAME or segm/NAME, e.g. segm/AP, bbox/AP50, segm/APs",
        )
    if "model_name" in merged:
        check(
            bool(MODEL_NAME_PATTERN.match(str(merged["model_name"]))),
            f"model_name={merged['model_name']!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    if problems:
        raise ParameterError("invalid parameters:\n  " + "\n  ".join(problems))
    return merged


def check_bucket_exists(root: str, endpoint_url: Optional[str] = None) -> None:
    """Ask the object store (AWS_ENDPOINT_URL and the AWS credential chain of this machine) whether
    root's bucket exists."""
    from cascade_rcnn import storage

    bucket = check_s3_root("root", root)
    try:
        # A HEAD on a key: answers False for a missing key, raises for a missing bucket.
        storage.exists(storage.join(f"s3://{bucket}", ".cascade-rcnn-probe"), endpoint_url=endpoint_url)
    except storage.StorageError as e:
        raise ParameterError(f"root={root!r}: bucket {bucket!r} is not usable: {e}") from None


def kfp_cron(expr: str) -> str:
    """A five-field cron ("0 2 * * *": 02:00 daily) -> KFP's six fields, seconds first ("0 0 2 * * *").

    KFP reads a five-field expression as starting with seconds, so "0 2 * * *" would run at minute 2
    of every hour; this rejects anything but five fields instead of guessing.
    """
    fields = expr.split()
    if len(fields) != len(CRON_FIELDS):
        raise ParameterError(
            f"--cron {expr!r} has {len(fields)} field(s); give five: {' '.join(CRON_FIELDS)} "
            "(e.g. '0 2 * * *' for 02:00 every day)"
        )
    for name, value in zip(CRON_FIELDS, fields):
        if not _CRON_FIELD.match(value):
            raise ParameterError(f"--cron {expr!r}: the {name} field {value!r} is not a cron field")
    return "0 " + " ".join(fields)
