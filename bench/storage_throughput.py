"""Storage throughput against a local SeaweedFS: cascade_rcnn.storage next to `aws s3 cp --recursive`.

Data sets (generated, random bytes): a tree of --files files of --file-kb KB, and one --big-mb MB file.
Each is uploaded and downloaded by both tools, in alternating order per repeat, to its own prefix on
the same server in the same run. Prints one JSON object: MB/s per tool, data set and direction
(best of the repeats) and every raw timing.

    .venv/bin/python bench/storage_throughput.py [--files 2000 --file-kb 100 --big-mb 512 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cascade_rcnn import storage
from cascade_rcnn.local_s3 import start_seaweedfs
from cascade_rcnn.logs import setup_logging

BUCKET = "bench"


def make_tree(root: Path, files: int, size: int) -> int:
    """files x size random bytes in 20 sub-directories (COCO-like flat-ish layout)."""
    for i in range(files):
        sub = root / f"part{i % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:012d}.jpg").write_bytes(os.urandom(size))
    return files * size


def make_big(root: Path, size: int) -> int:
    root.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(
        16 * 1024 * 1024
    )  # repeated random chunk: generation stays cheap, bytes stay incompressible
    with open(root / "model_final.pth", "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    return size


def tree_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def aws_cp(aws: str, env: dict, endpoint: str, src: str, dst: str) -> None:
    cmd = [aws, "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", endpoint, src, dst]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def _cpu_s(tool: str) -> float:
    """CPU seconds used so far by the client: this process for ours, finished children for awscli."""
    usage = resource.getrusage(resource.RUSAGE_SELF if tool == "ours" else resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def transfer(
    tool: str, src: Path, prefix: str, out: Path, args: argparse.Namespace, env: dict, endpoint: str
) -> list[tuple[str, float, float]]:
    """Upload src (a directory) to prefix, download it back to out; returns
    [(direction, wall s, client CPU s)] for upload and download."""
    timings = []
    for direction in ("upload", "download"):
        t0, c0 = time.perf_counter(), _cpu_s(tool)
        if tool == "ours" and direction == "upload":
            storage.upload_tree(src, prefix, workers=args.workers, progress=False)
        elif tool == "ours":
            storage.download_tree(prefix, out, workers=args.workers, progress=False, fsync=not args.no_fsync)
        elif direction == "upload":
            aws_cp(args.aws, env, endpoint, str(src), prefix + "/")
        else:
            aws_cp(args.aws, env, endpoint, prefix + "/", str(out))
        timings.append((direction, time.perf_counter() - t0, _cpu_s(tool) - c0))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-kb", type=int, default=100)
    parser.add_argument("--big-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=16, help="storage tree/transfer workers")
    parser.add_argument("--no-fsync", action="store_true", help="our tree download without per-file fsync")
    parser.add_argument("--aws", default=str(Path(sys.executable).with_name("aws")), help="awscli binary")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    if not (os.path.isfile(args.aws) or shutil.which(args.aws)):
        parser.error(f"awscli not found at {args.aws} (pip install awscli or pass --aws)")

    load_start = [round(x, 2) for x in os.getloadavg()]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="storage-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tree, big = work / "data" / "tree", work / "data" / "big"
        sizes = {
            "tree": make_tree(tree, args.files, args.file_kb * 1000),
            "big": make_big(big, args.big_mb * 2**20),
        }
        with start_seaweedfs(work / "s3", remove_data=True) as server:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(server.env())
            env.update(
                AWS_CONFIG_FILE=str(work / "no-aws-config"),
                AWS_SHARED_CREDENTIALS_FILE=str(work / "no-creds"),
            )
            os.environ.update(server.env())
            storage._client(server.endpoint_url).create_bucket(Bucket=BUCKET)
            # Warm-up (not timed): the first writes make SeaweedFS grow volumes.
            storage.upload_tree(
                tree / "part00", f"s3://{BUCKET}/warmup", workers=args.workers, progress=False
            )
            aws_cp(args.aws, env, server.endpoint_url, str(tree / "part01"), f"s3://{BUCKET}/warmup-aws/")

            runs: list[dict] = []
            for rep in range(args.repeats):
                tools = ["ours", "awscli"] if rep % 2 == 0 else ["awscli", "ours"]
                for tool in tools:
                    for name, src in (("tree", tree), ("big", big)):
                        prefix = f"s3://{BUCKET}/{tool}-{rep}/{name}"
                        out = work / "out" / f"{tool}-{rep}-{name}"
                        timings = transfer(tool, src, prefix, out, args, env, server.endpoint_url)
                        if tree_bytes(out) != tree_bytes(src):
                            raise RuntimeError(
                                f"{tool} {name}: downloaded {tree_bytes(out)} != source {tree_bytes(src)}"
                            )
                        shutil.rmtree(out)
                        storage.delete_prefix(prefix + "/")
                        for direction, seconds, cpu in timings:
                            runs.append(
                                {
                                    "repeat": rep,
                                    "tool": tool,
                                    "data": name,
                                    "direction": direction,
                                    "seconds": round(seconds, 3),
                                    "MBps": round(sizes[name] / 1e6 / seconds, 1),
                                    "client_cpu_s": round(cpu, 2),
                                }
                            )
                            print(
                                f"# {rep} {tool:6s} {name:4s} {direction:8s} {seconds:6.2f} s, client CPU {cpu:5.2f} s",
                                file=sys.stderr,
                            )

        best: dict = {}
        for r in runs:
            entry = best.setdefault(f"{r['data']}_{r['direction']}", {}).setdefault(r["tool"], {"MBps": 0.0})
            if r["MBps"] > entry["MBps"]:
                entry.update(MBps=r["MBps"], cpu=r["client_cpu_s"])
        summary = {
            key: {
                "ours_MBps": v["ours"]["MBps"],
                "awscli_MBps": v["awscli"]["MBps"],
                "ratio": round(v["ours"]["MBps"] / v["awscli"]["MBps"], 2),
                "ours_client_cpu_s": v["ours"]["cpu"],
                "awscli_client_cpu_s": v["awscli"]["cpu"],
            }
            for key, v in best.items()
        }
        result = {
            "benchmark": "storage_throughput",
            "server": "SeaweedFS weed mini on 127.0.0.1 (same machine)",
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_average_at_start": load_start,
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            },
            "data": {
                "tree": {
                    "files": args.files,
                    "file_bytes": args.file_kb * 1000,
                    "total_MB": sizes["tree"] / 1e6,
                },
                "big": {"files": 1, "total_MB": sizes["big"] / 1e6},
            },
            "ours": {
                "workers": args.workers,
                "fsync_on_download": not args.no_fsync,
                "multipart_threshold_MiB": storage.MULTIPART_THRESHOLD // 2**20,
                "multipart_chunk_MiB": storage.MULTIPART_CHUNKSIZE // 2**20,
                "multipart_concurrency": storage.MULTIPART_CONCURRENCY,
            },
            "awscli": {"command": "aws s3 cp --recursive --only-show-errors (default settings)"},
            "best_of_repeats": summary,
            "target_tree_upload_at_least_awscli": summary["tree_upload"]["ratio"] >= 1.0,
            "runs": runs,
        }
        print(json.dumps(result, indent=1))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
