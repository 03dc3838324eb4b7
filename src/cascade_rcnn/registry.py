"""The model registry: which model is the champion, and every decision about it, in object storage.

Layout under `<root>/models/<model name>/`:
    champion.json                                  the current champion (ChampionRecord)
    history/<UTC time>-<run id>-<decision>-<nonce>.json
                                                   one record per decision (promoted, rejected,
                                                   skipped), never rewritten

Races: champion.json only changes by a conditional write against the version the deciding run read
(storage.put_bytes_if: If-Match / If-None-Match on S3). A run that loses the race reads the new
champion and decides again against it, so no decision is lost and, of two racing challengers, the
better one ends as champion. History records have unique names and are written only if absent.
Readers see whole records: an S3 PUT and a local rename are atomic. `check_conditional_writes` makes
sure the server honours the condition before anything relies on it.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cascade_rcnn import storage
from cascade_rcnn.errors import CascadeRCNNError

logger = logging.getLogger(__name__)

CHAMPION = "champion.json"
HISTORY = "history"
DEFAULT_METRIC = "segm/AP"
DECISIONS = ("promoted", "rejected", "skipped")
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_ATTEMPTS = 20


class RegistryError(CascadeRCNNError, ValueError):
    """A registry record is malformed, or the registry cannot be used safely; names the URI and key."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class ChampionRecord:
    """A model as the registry knows it (champion.json, and the challenger of a decision).

    metrics: evaluate_coco's {"bbox"|"segm": {"AP", ..., "AP-<class>"}} on `eval_split` at
    `eval_data_version`; data_version: the training split's (ingest.manifest.data_version)."""

    model_name: str
    checkpoint_uri: str
    config: str
    config_opts: list[str]
    dataset: str  # the ingest manifest URI
    train_split: str
    data_version: str
    eval_split: str
    eval_data_version: str
    metrics: dict[str, dict[str, float | None]]
    run_id: str
    time: str = field(default_factory=utc_now)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, uri: str) -> ChampionRecord:
        """Validate every key (present, of its type) and build the record; errors name uri and key."""
        if not isinstance(data, Mapping):
            raise RegistryError(f"{uri}: expected a JSON object, got {type(data).__name__}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                raise RegistryError(f"{uri}: key {f.name!r} is missing")
            values[f.name] = _checked(f.name, data[f.name], uri)
        unknown = sorted(set(data) - set(values))
        if unknown:
            raise RegistryError(f"{uri}: unknown key(s) {', '.join(map(repr, unknown))}")
        return cls(**values)

    def metric(self, name: str) -> float:
        return metric_value(self.metrics, name)


def _checked(key: str, value: Any, uri: str) -> Any:
    if key == "config_opts":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RegistryError(f"{uri}: key 'config_opts' must be a list of strings, got {value!r}")
        return list(value)
    if key == "metrics":
        ok = isinstance(value, Mapping) and all(
            isinstance(task, str)
            and isinstance(vals, Mapping)
            and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in vals.values()
            )
            for task, vals in value.items()
        )
        if not ok:
            raise RegistryError(
                f"{uri}: key 'metrics' must map tasks to {{name: number or null}}, got {value!r}"
            )
        return {
            t: {k: (None if v is None else float(v)) for k, v in vals.items()} for t, vals in value.items()
        }
    if not isinstance(value, str):
        raise RegistryError(f"{uri}: key {key!r} must be a string, got {type(value).__name__} {value!r}")
    if key in ("model_name", "checkpoint_uri", "data_version", "eval_data_version") and not value:
        raise RegistryError(f"{uri}: key {key!r} is empty")
    return value


def metric_value(metrics: Mapping[str, Mapping[str, float | None]], name: str) -> float:
    """metrics["segm"]["AP"] for "segm/AP"; NaN when absent or null (nothing to average)."""
    task, sep, key = name.partition("/")
    if not sep or not task or not key:
        raise RegistryError(f"metric {name!r}: expected TASK/NAME, e.g. segm/AP or bbox/AP50")
    value = metrics.get(task, {}).get(key)
    return math.nan if value is None else float(value)


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.match(name):
        raise RegistryError(
            f"model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def registry_uri(root: str, model_name: str) -> str:
    return storage.join(root, "models", check_model_name(model_name))


def read_champion(root: str, model_name: str) -> tuple[ChampionRecord | None, str | None]:
    """(champion, its version for a conditional write), or (None, None) when there is none yet."""
    uri = storage.join(registry_uri(root, model_name), CHAMPION)
    try:
        data, version = storage.get_versioned(uri)
    except storage.NotFound:
        return None, None
    try:
        parsed = json.loads(data)
    except ValueError as e:
        raise RegistryError(f"{uri}: not JSON ({e})") from e
    return ChampionRecord.from_json(parsed, uri), version


def read_history(root: str, model_name: str) -> list[dict]:
    """Every decision record, oldest first (the names start with the UTC time)."""
    prefix = storage.join(registry_uri(root, model_name), HISTORY) + "/"
    records = []
    for uri in storage.list_prefix(prefix):
        if not uri.endswith(".json"):
            continue
        try:
            record = json.loads(storage.get_bytes(uri))
        except ValueError as e:
            raise RegistryError(f"{uri}: not JSON ({e})") from e
        for key in ("decision", "reason", "time", "run_id"):
            if key not in record:
                raise RegistryError(f"{uri}: key {key!r} is missing")
        if record["decision"] not in DECISIONS:
            raise RegistryError(f"{uri}: key 'decision' is {record['decision']!r}, not one of {DECISIONS}")
        records.append({**record, "uri": uri})
    return records


def append_history(root: str, model_name: str, record: Mapping[str, Any]) -> str:
    """Write one decision record under a new, unique name; returns its URI."""
    if record.get("decision") not in DECISIONS:
        raise RegistryError(f"history record: decision {record.get('decision')!r} is not one of {DECISIONS}")
    stamp = re.sub(r"[^0-9T]", "", str(record["time"]))[:21]
    run = re.sub(r"[^A-Za-z0-9_.-]", "_", str(record.get("run_id") or "run"))[:64]
    name = f"{stamp}-{run}-{record['decision']}-{uuid.uuid4().hex[:8]}.json"
    uri = storage.join(registry_uri(root, model_name), HISTORY, name)
    storage.put_bytes_if(json.dumps(record, indent=1).encode(), uri, None)
    return uri


def check_conditional_writes(root: str, model_name: str) -> None:
    """Refuse an object store that ignores If-None-Match: on it a racing promotion could be lost."""
    probe = storage.join(registry_uri(root, model_name), f".conditional-write-probe-{uuid.uuid4().hex}")
    try:
        storage.put_bytes_if(b"1", probe, None)
        try:
            storage.put_bytes_if(b"2", probe, None)
        except storage.PreconditionFailed:
            return
        raise RegistryError(
            f"the object store of {root} ignored a conditional write (If-None-Match: * on {probe}); "
            "the registry needs conditional writes to keep racing promotions: use AWS S3, SeaweedFS or "
            "MinIO (or a version of your server that supports them)"
        )
    finally:
        storage.delete(probe)


@dataclass(frozen=True)
class Comparison:
    promote: bool
    reason: str
    challenger: float
    champion: float | None
    delta: float | None


def compare(
    challenger: Mapping, champion: Mapping | None, metric: str = DEFAULT_METRIC, min_improvement: float = 0.0
) -> Comparison:
    """Promote when there is no champion, or when the challenger's `metric` exceeds the champion's by
    more than 0 and by at least `min_improvement` (AP points). A NaN challenger never wins."""
    ours = metric_value(challenger, metric)
    if math.isnan(ours):
        theirs = None if champion is None else metric_value(champion, metric)
        return Comparison(False, f"the challenger has no {metric} (nothing to average)", ours, theirs, None)
    if champion is None:
        return Comparison(True, f"no champion yet; challenger {metric} {ours:.3f}", ours, None, None)
    theirs = metric_value(champion, metric)
    if math.isnan(theirs):
        return Comparison(True, f"the champion has no {metric}; challenger {ours:.3f}", ours, theirs, None)
    delta = ours - theirs
    promote = delta > 0 and delta >= min_improvement
    verdict = "beats" if promote else "does not beat"
    return Comparison(
        promote,
        f"challenger {metric} {ours:.3f} {verdict} champion {theirs:.3f} (delta {delta:+.3f}; "
        f"promotion needs more than 0 and at least {min_improvement:g})",
        ours,
        theirs,
        delta,
    )


@dataclass(frozen=True)
class Decision:
    decision: str  # promoted | rejected
    reason: str
    challenger: ChampionRecord
    champion_before: ChampionRecord | None
    champion_metrics: dict | None  # the champion's metrics on the challenger's evaluation data
    champion: ChampionRecord  # the champion after the decision
    history_uri: str
    attempts: int


def promote_if_better(
    root: str,
    challenger: ChampionRecord,
    *,
    metric: str = DEFAULT_METRIC,
    min_improvement: float = 0.0,
    champion_metrics: Callable[[ChampionRecord], dict] | None = None,
) -> Decision:
    """Decide about `challenger` against the current champion and record the decision.

    champion_metrics(champion) gives the champion's metrics on the challenger's evaluation data when
    the champion's record is for other data (eval_data_version differs); without it such a champion is
    compared as recorded, with a warning. A lost race (the champion changed between read and write)
    starts over from the new champion; a re-evaluated champion that stays is recorded with its new
    numbers, by the same conditional write."""
    name = challenger.model_name
    metric_value(challenger.metrics, metric)  # a malformed metric name fails before anything is written
    check_conditional_writes(root, name)
    champion_uri = storage.join(registry_uri(root, name), CHAMPION)
    evaluated: dict[str, dict] = {}  # checkpoint uri -> metrics on the challenger's data
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        current, version = read_champion(root, name)
        theirs = None
        if current is not None:
            theirs = current.metrics
            if current.eval_data_version != challenger.eval_data_version:
                if champion_metrics is not None:
                    if current.checkpoint_uri not in evaluated:
                        evaluated[current.checkpoint_uri] = champion_metrics(current)
                    theirs = evaluated[current.checkpoint_uri]
                else:
                    logger.warning(
                        "champion %s was evaluated on %s, the challenger on %s: comparing as recorded",
                        current.checkpoint_uri,
                        current.eval_data_version,
                        challenger.eval_data_version,
                    )
        verdict = compare(challenger.metrics, theirs, metric, min_improvement)
        after = challenger if verdict.promote else current
        if not verdict.promote and current is not None and theirs is not current.metrics:
            after = ChampionRecord(
                **{
                    **current.to_json(),
                    "metrics": theirs,
                    "eval_data_version": challenger.eval_data_version,
                    "eval_split": challenger.eval_split,
                }  # fmt: skip
            )
        if after is not current:
            try:
                storage.put_bytes_if(json.dumps(after.to_json(), indent=1).encode(), champion_uri, version)
            except storage.PreconditionFailed:
                logger.info("champion changed while deciding (attempt %d); deciding again", attempt)
                continue
        decision = "promoted" if verdict.promote else "rejected"
        record = {
            "decision": decision,
            "reason": verdict.reason,
            "time": utc_now(),
            "run_id": challenger.run_id,
            "model_name": name,
            "metric": metric,
            "min_improvement": min_improvement,
            "challenger": challenger.to_json(),
            "champion_before": None if current is None else current.to_json(),
            "champion_metrics": theirs,
        }
        history_uri = append_history(root, name, record)
        logger.info("%s: %s (%s); recorded in %s", name, decision, verdict.reason, history_uri)
        assert after is not None
        return Decision(decision, verdict.reason, challenger, current, theirs, after, history_uri, attempt)
    raise RegistryError(
        f"{champion_uri}: the champion changed {_MAX_ATTEMPTS} times while deciding; giving up so no "
        "decision is written against a record that was never read"
    )


def record_skip(root: str, model_name: str, run_id: str, reason: str, **details: Any) -> str:
    """A 'skipped' history record (no training); returns its URI."""
    record = {"decision": "skipped", "reason": reason, "time": utc_now(), "run_id": run_id,
              "model_name": model_name, **details}  # fmt: skip
    return append_history(root, model_name, record)
