"""The model registry against SeaweedFS (and a local root): conditional writes, racing promotions,
the promotion rule, malformed records, and the data version it compares."""

import json
import shutil
import threading

import pytest

from cascade_rcnn import registry, storage
from cascade_rcnn.ingest.manifest import data_version
from cascade_rcnn.registry import ChampionRecord, RegistryError


def record(ap: float, run: str, eval_version: str = "ev1", model: str = "m") -> ChampionRecord:
    return ChampionRecord(
        model_name=model,
        checkpoint_uri=f"s3://b/runs/{run}/model_final.pth",
        config="configs/x.yaml",
        config_opts=["SEED", "1"],
        dataset="s3://b/datasets/d/manifest.json",
        train_split="train2017",
        data_version="dv1-abc",
        eval_split="val2017",
        eval_data_version=eval_version,
        metrics={"bbox": {"AP": ap + 1.0, "AP-cat": None}, "segm": {"AP": ap}},
        run_id=run,
    )


@pytest.fixture(params=["s3", "local"])
def root(request, tmp_path):
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_env")
        return f"s3://{bucket}/cascade-rcnn"
    return str(tmp_path / "root")


def test_conditional_put_refuses_stale_and_existing(root):
    uri = storage.join(root, "models", "m", "champion.json")
    v1 = storage.put_bytes_if(b"one", uri, None)
    with pytest.raises(storage.PreconditionFailed, match="exists already"):
        storage.put_bytes_if(b"two", uri, None)
    data, version = storage.get_versioned(uri)
    assert (data, version) == (b"one", v1)
    v2 = storage.put_bytes_if(b"three", uri, version)
    with pytest.raises(storage.PreconditionFailed, match="no longer version"):
        storage.put_bytes_if(b"four", uri, v1)  # v1 is stale now
    assert storage.get_versioned(uri) == (b"three", v2)
    with pytest.raises(storage.NotFound):
        storage.get_versioned(storage.join(root, "nothing.json"))


def test_first_model_is_promoted_and_worse_is_rejected_with_history(root):
    first = registry.promote_if_better(root, record(30.0, "r1"))
    assert first.decision == "promoted" and first.champion_before is None
    worse = registry.promote_if_better(root, record(29.0, "r2"))
    assert worse.decision == "rejected"
    champion, _ = registry.read_champion(root, "m")
    assert champion.run_id == "r1" and champion.metric("segm/AP") == 30.0
    history = registry.read_history(root, "m")
    assert [h["decision"] for h in history] == ["promoted", "rejected"]
    assert history[1]["champion_before"]["run_id"] == "r1"
    assert "does not beat" in history[1]["reason"]
    better = registry.promote_if_better(root, record(31.0, "r3"))
    assert better.decision == "promoted"
    assert registry.read_champion(root, "m")[0].run_id == "r3"


def test_racing_promotions_lose_no_decision(s3_env):
    """Eight challengers decide at once. Whatever the interleaving, every decision is in the
    history and the best challenger ends as champion (a lost update would leave a worse one)."""
    root = f"s3://{s3_env}/race"
    registry.promote_if_better(root, record(10.0, "base"))
    aps = [11.0, 17.0, 12.0, 16.0, 13.0, 15.0, 14.0, 18.0]
    barrier = threading.Barrier(len(aps))
    decisions, errors = {}, []

    def contend(ap: float) -> None:
        try:
            barrier.wait()
            decisions[ap] = registry.promote_if_better(root, record(ap, f"r{ap:g}"))
        except Exception as e:  # reported below; a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=contend, args=(ap,)) for ap in aps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    champion, _ = registry.read_champion(root, "m")
    assert champion.run_id == "r18"
    history = registry.read_history(root, "m")
    assert len(history) == 1 + len(aps)
    assert sorted(h["run_id"] for h in history[1:]) == sorted(f"r{ap:g}" for ap in aps)
    assert decisions[18.0].decision == "promoted"
    print("attempts per decision:", sorted(d.attempts for d in decisions.values()))
    # Each promotion was decided against the champion it replaced: the chain of promoted records
    # climbs, and every rejection lost to the champion it saw.
    for h in history:
        before = h.get("champion_before")
        if before is not None:
            ours, theirs = h["challenger"]["metrics"]["segm"]["AP"], before["metrics"]["segm"]["AP"]
            assert (ours > theirs) == (h["decision"] == "promoted"), h["reason"]


def test_a_stale_write_is_refused_and_the_decision_taken_again(s3_env):
    root = f"s3://{s3_env}/stale"
    registry.promote_if_better(root, record(10.0, "base"))
    uri = storage.join(registry.registry_uri(root, "m"), registry.CHAMPION)
    _, seen = storage.get_versioned(uri)
    registry.promote_if_better(root, record(20.0, "fast"))  # lands between our read and our write
    with pytest.raises(storage.PreconditionFailed):
        storage.put_bytes_if(json.dumps(record(15.0, "slow").to_json()).encode(), uri, seen)
    decision = registry.promote_if_better(root, record(15.0, "slow"))
    assert decision.decision == "rejected" and decision.champion_before.run_id == "fast"


def test_champion_evaluated_on_other_data_is_reevaluated_and_recorded(root):
    registry.promote_if_better(root, record(40.0, "old", eval_version="ev-old"))
    calls = []

    def evaluate(champion):
        calls.append(champion.run_id)
        return {"bbox": {"AP": 26.0}, "segm": {"AP": 25.0}}  # on the new evaluation data

    decision = registry.promote_if_better(
        root, record(30.0, "new", eval_version="ev-new"), champion_metrics=evaluate
    )
    assert calls == ["old"]
    assert decision.decision == "promoted"  # 30 beats the champion's 25 on the same data, not its recorded 40
    assert decision.champion_metrics["segm"]["AP"] == 25.0
    assert registry.read_history(root, "m")[-1]["champion_metrics"]["segm"]["AP"] == 25.0

    registry.promote_if_better(root, record(20.0, "low", eval_version="ev-newer"), champion_metrics=evaluate)
    kept, _ = registry.read_champion(root, "m")
    # Rejected: the kept champion now carries its numbers on the newer data, so the next run need not
    # evaluate it again.
    assert kept.run_id == "new" and kept.eval_data_version == "ev-newer" and kept.metric("segm/AP") == 25.0


def test_promotion_rule():
    champ = {"segm": {"AP": 30.0}}
    assert registry.compare({"segm": {"AP": 30.5}}, champ, min_improvement=0.5).promote
    assert not registry.compare({"segm": {"AP": 30.4}}, champ, min_improvement=0.5).promote
    assert not registry.compare({"segm": {"AP": 30.0}}, champ).promote  # a tie keeps the champion
    assert registry.compare({"segm": {"AP": 0.1}}, None).promote  # the first model
    assert not registry.compare({"segm": {"AP": None}}, None).promote  # NaN never wins
    assert registry.compare({"bbox": {"AP50": 61.0}}, {"bbox": {"AP50": 60.0}}, "bbox/AP50").promote
    with pytest.raises(RegistryError, match="TASK/NAME"):
        registry.compare({"segm": {"AP": 1.0}}, champ, "AP")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("checkpoint_uri"), "key 'checkpoint_uri' is missing"),
        (lambda d: d.update(metrics={"segm": {"AP": "high"}}), "key 'metrics' must map"),
        (lambda d: d.update(config_opts="SEED 1"), "key 'config_opts' must be a list of strings"),
        (lambda d: d.update(data_version=3), "key 'data_version' must be a string"),
        (lambda d: d.update(data_version=""), "key 'data_version' is empty"),
        (lambda d: d.update(colour="red"), "unknown key"),
    ],
)
def test_bad_champion_record_names_the_key(root, edit, message):
    data = record(1.0, "r").to_json()
    edit(data)
    uri = storage.join(registry.registry_uri(root, "m"), registry.CHAMPION)
    storage.put_bytes(json.dumps(data).encode(), uri)
    with pytest.raises(RegistryError, match=message) as info:
        registry.read_champion(root, "m")
    assert uri in str(info.value)
    with pytest.raises(RegistryError):  # and no decision is taken against it
        registry.promote_if_better(root, record(2.0, "r2"))


def test_bad_history_record_and_bad_names(root):
    uri = storage.join(registry.registry_uri(root, "m"), registry.HISTORY, "x.json")
    storage.put_bytes(b'{"decision": "maybe", "reason": "", "time": "", "run_id": ""}', uri)
    with pytest.raises(RegistryError, match="key 'decision' is 'maybe'"):
        registry.read_history(root, "m")
    storage.put_bytes(b"{not json", storage.join(registry.registry_uri(root, "n"), registry.CHAMPION))
    with pytest.raises(RegistryError, match="champion.json: not JSON"):
        registry.read_champion(root, "n")
    with pytest.raises(RegistryError, match="model name '../x'"):
        registry.registry_uri(root, "../x")


def test_data_version_follows_content_only(tmp_path):
    from cascade_rcnn.data.shapes import make_shapes
    from cascade_rcnn.ingest import ingest_coco
    from cascade_rcnn.ingest.manifest import read_manifest

    make_shapes(str(tmp_path / "a"), num_train=4, num_val=2, seed=0, min_size=64, max_size=96)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    make_shapes(str(tmp_path / "more"), num_train=5, num_val=2, seed=0, min_size=64, max_size=96)

    def versions(src: str, root: str) -> dict:
        result = ingest_coco(str(tmp_path / src), str(tmp_path / root), name="shapes")
        assert result.data_versions == {
            s: data_version(read_manifest(result.manifest_uri), s) for s in ("train2017", "val2017")
        }
        return result.data_versions

    a = versions("a", "r1")
    assert versions("copy", "r2") == a  # another source path and root, the same bytes
    more = versions("more", "r3")
    assert more["train2017"] != a["train2017"]
    assert more["val2017"] == a["val2017"]  # only the training split grew
    assert all(v.startswith("dv1-") and len(v) == 36 for v in a.values())
    with pytest.raises(ValueError, match="no split 'test2017'"):
        data_version(
            read_manifest(str(tmp_path / "r1" / "datasets" / "shapes" / "manifest.json")), "test2017"
        )
