"""Submit the compiled pipeline as a run, or schedule it as a recurring run, through kfp.Client.

Both check everything they can first (parameters against the package's declared inputs, the root,
the cron expression, optionally the bucket) and only then open a connection, so a bad parameter
never reaches the KFP API.

Connection: `endpoint` (else $KF_PIPELINES_ENDPOINT, else kfp's in-cluster / kube-config lookup);
a bearer token from $KFP_TOKEN when set, otherwise kfp.Client's own credentials (the service
account token at $KF_PIPELINES_SA_TOKEN_PATH, or the kube config).
"""

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import yaml

from cascade_rcnn.errors import CascadeRCNNError
from pipelines.params import (
    ParameterError,
    check_bucket_exists,
    check_params,
    kfp_cron,
    parse_params,
    pipeline_inputs,
)

log = logging.getLogger(__name__)
TOKEN_ENV = "KFP_TOKEN"
_PIPELINE_ROOT_SCHEMES = ("s3://", "minio://", "gs://")
# What the fetch_weights step resolves without this machine (cascade_rcnn.weight_sources).
_CLUSTER_WEIGHTS_SCHEMES = ("detectron2://", "torchvision://", "https://", "http://", "s3://")


class KFPError(CascadeRCNNError):
    """The KFP API could not be reached, or refused a request; the message names the endpoint."""


@dataclass(frozen=True)
class Connection:
    endpoint: Optional[str] = None
    namespace: Optional[str] = None
    ui_endpoint: Optional[str] = None  # where the run's link points; default: endpoint

    def client(self):
        import kfp

        kwargs: dict[str, Any] = {"host": self.endpoint, "ui_host": self.ui_endpoint}
        if self.namespace:
            kwargs["namespace"] = self.namespace
        token = os.environ.get(TOKEN_ENV)
        if token:
            kwargs["existing_token"] = token
        return kfp.Client(**kwargs)

    @contextlib.contextmanager
    def api(self) -> Iterator[None]:
        """Turns a connection failure or an API refusal (an HTTP status) into a KFPError."""
        import urllib3
        from kfp_server_api.exceptions import ApiException

        where = self.endpoint or os.environ.get("KF_PIPELINES_ENDPOINT") or "the in-cluster KFP API"
        try:
            yield
        except ApiException as e:
            body = " ".join(str(e.body or "").split())[:500]
            raise KFPError(f"{where}: the KFP API answered {e.status} {e.reason}: {body}") from e
        except urllib3.exceptions.HTTPError as e:
            reason = getattr(e, "reason", None) or e
            raise KFPError(f"{where}: cannot reach the KFP API: {reason}") from e

    def run_url(self, run_id: str) -> str:
        base = self.ui_endpoint or os.environ.get("KF_PIPELINES_UI_ENDPOINT") or self.endpoint or ""
        base = base.rstrip("/")
        if base and not base.startswith(("http://", "https://")):
            base = "http://" + base
        return f"{base or '/pipeline'}/#/runs/details/{run_id}"


def prepare(
    package: Union[str, Path],
    param_pairs: list[str],
    *,
    pipeline_root: Optional[str] = None,
    check_bucket: bool = False,
) -> dict[str, Any]:
    """Parse and check the run parameters; returns those given (typed), ready for kfp.Client."""
    inputs = pipeline_inputs(package)
    params = parse_params(param_pairs, inputs)
    merged = check_params(params, inputs)
    if pipeline_root is not None and not pipeline_root.startswith(_PIPELINE_ROOT_SCHEMES):
        raise ParameterError(
            f"--pipeline-root {pipeline_root!r}: use an object-store URI "
            f"({', '.join(s + '...' for s in _PIPELINE_ROOT_SCHEMES)})"
        )
    weights = str(merged.get("weights") or "")
    if weights and not weights.startswith(_CLUSTER_WEIGHTS_SCHEMES):
        raise ParameterError(
            f"weights={weights!r}: the cluster's steps cannot read a path of this machine; use "
            f"{', '.join(s + '...' for s in _CLUSTER_WEIGHTS_SCHEMES)} (upload a file with aws s3 cp)"
        )
    if check_bucket:
        check_bucket_exists(merged["root"])
    return params


def without_caching(package: Union[str, Path], output: Union[str, Path]) -> Path:
    """A copy of the package with caching off in every task, the ones inside conditions included
    (kfp.Client's enable_caching=False only reaches the tasks of the root DAG)."""
    with open(package) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    spec = next(d for d in docs if "root" in d)
    for comp in [spec["root"], *spec.get("components", {}).values()]:
        for task in comp.get("dag", {}).get("tasks", {}).values():
            task.setdefault("cachingOptions", {})["enableCache"] = False
    output = Path(output)
    with open(output, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=True)
    return output


def submit(
    package: Union[str, Path],
    params: Mapping[str, Any],
    conn: Connection,
    *,
    experiment: str = "cascade-rcnn",
    run_name: Optional[str] = None,
    pipeline_root: Optional[str] = None,
    enable_caching: Optional[bool] = None,
    service_account: Optional[str] = None,
) -> str:
    """Create one run; returns its URL. enable_caching=False turns caching off in every task;
    None keeps the package's settings."""
    with conn.api(), tempfile.TemporaryDirectory(prefix="cascade-rcnn-submit-") as tmp:
        client = conn.client()
        if enable_caching is False:
            package = without_caching(package, Path(tmp) / "pipeline.yaml")
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=dict(params),
            run_name=run_name,
            experiment_name=experiment,
            namespace=conn.namespace,
            pipeline_root=pipeline_root,
            enable_caching=enable_caching,
            service_account=service_account,
        )
    return conn.run_url(result.run_id)


def schedule(
    package: Union[str, Path],
    params: Mapping[str, Any],
    conn: Connection,
    cron: str,
    *,
    name: str,
    experiment: str = "cascade-rcnn",
    pipeline_root: Optional[str] = None,
    service_account: Optional[str] = None,
) -> str:
    """Create a recurring run on a five-field cron; returns the recurring run's id.

    Caching is off (retraining on unchanged parameters would otherwise reuse the first run's
    outputs), at most one run at a time, and missed runs are not caught up.
    """
    six_field = kfp_cron(cron)
    with conn.api(), tempfile.TemporaryDirectory(prefix="cascade-rcnn-schedule-") as tmp:
        client = conn.client()
        experiment_id = client.create_experiment(name=experiment, namespace=conn.namespace).experiment_id
        job = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=name,
            cron_expression=six_field,
            max_concurrency=1,
            no_catchup=True,
            params=dict(params),
            pipeline_package_path=str(without_caching(package, Path(tmp) / "pipeline.yaml")),
            enable_caching=False,
            pipeline_root=pipeline_root,
            service_account=service_account,
        )
    log.info("recurring run %s: %s (KFP cron %r)", job.recurring_run_id, name, six_field)
    return job.recurring_run_id
