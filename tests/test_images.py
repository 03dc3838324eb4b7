"""The container images, checked without building them (make test-containers builds the cpu one).

hadolint lints every Dockerfile; the Dockerfiles are parsed and held against the package they
install (pyproject.toml): the package and its CLI go in with the pipeline extra, the entry point
passes the components' command through, the user is numeric and non-root, no credentials, and the
torch pins agree with the package's ranges and with each other.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
TARGETS = ("cpu", "ascend", "ascend-cann8.5", "cuda")
ASCEND_TARGETS = ("ascend", "ascend-cann8.5")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SECRET_NAME = re.compile(r"(secret|passw|token|credential|api[_-]?key|access[_-]?key|private)", re.I)
SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----)")

# torch_npu releases paired with each CANN (Ascend Extension for PyTorch's compatibility table).
TORCH_NPU_FOR_CANN = {
    "8.1.rc1": {"2.5.1", "2.4.0.post4", "2.3.1.post6", "2.1.0.post12"},
    "8.2.rc1": {"2.6.0", "2.5.1.post1", "2.1.0.post13"},
    "8.3.rc1": {"2.8.0", "2.7.1", "2.6.0.post3", "2.1.0.post17"},
    "8.5.0": {"2.9.0", "2.8.0.post2", "2.7.1.post2", "2.6.0.post5"},
}


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the logical line, continuations joined
    line: int


@dataclass
class Stage:
    base: str  # FROM's image, ${VAR}s resolved from the global ARGs
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str]:
        """ARG defaults declared in this stage (NAME -> default, '' when none)."""
        out = {}
        for ins in self.all("ARG"):
            name, _, default = ins.args.partition("=")
            out[name.strip()] = default.strip().strip('"')
        return out

    def env(self) -> dict[str, str]:
        """ENV values set in this stage, in the `ENV K=V ...` form."""
        out = {}
        for ins in self.all("ENV"):
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {ins.args!r} (line {ins.line}): use the KEY=VALUE form"
                out[key] = value
        return out


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def install_stage(self) -> Stage:
        """The stage that runs images/install.sh: the image's own (cpu, cuda) or a build stage (ascend)."""
        return next(s for s in self.stages if any("images/install.sh" in src for src, _, _ in copies(s)))


def parse_dockerfile(path: Path, build_args: dict[str, str] | None = None) -> Dockerfile:
    """The instructions of a Dockerfile grouped by stage (comments dropped, continuations joined),
    with `build_args` replacing the defaults of the ARGs they name, as `--build-arg` does."""
    build_args = build_args or {}
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    assert not pending, f"{path}: the file ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            assert keyword == "ARG", f"{path}:{number}: only ARG may come before the first FROM"
            name, _, default = args.partition("=")
            global_args[name.strip()] = build_args.get(name.strip(), default.strip())
        else:
            name = args.partition("=")[0].strip()
            if keyword == "ARG" and name in build_args:
                args = f"{name}={build_args[name]}"
            stages[-1].instructions.append(Instruction(keyword, args, number))
    return Dockerfile(path, global_args, stages)


def target_build_args(target: str, images: Path = IMAGES) -> tuple[Path, dict[str, str]]:
    """(Dockerfile, build args) of a target, as images/build.sh builds it: its own Dockerfile, or the
    one its build-args file names, with those arguments."""
    own = images / target / "Dockerfile"
    if own.is_file():
        return own, {}
    lines = (images / target / "build-args").read_text().splitlines()
    args = dict(line.partition("=")[::2] for line in lines if line and not line.startswith("#"))
    return images.parent / args.pop("DOCKERFILE"), {**args, "IMAGE_TARGET": target}


def dockerfile(target: str) -> Dockerfile:
    return parse_dockerfile(*target_build_args(target))


def exec_form(ins: Instruction) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD; the shell form would wrap the command in sh -c."""
    value = json.loads(ins.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), ins.args
    return value


def copies(stage: Stage) -> list[tuple[list[str], str, dict[str, str]]]:
    """(sources, destination, flags) of each COPY in the stage."""
    out = []
    for ins in stage.all("COPY"):
        words = shlex.split(ins.args)
        flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
        paths = [w for w in words if not w.startswith("--")]
        out.append((paths[:-1], paths[-1], flags))
    return out


def copied_to(stage: Stage, source: str) -> str:
    """Where a build-context path lands in the image (a destination ending in / keeps the name)."""
    for sources, dest, flags in copies(stage):
        if "from" not in flags and source in sources:
            return dest + Path(source).name if dest.endswith("/") else dest
    raise AssertionError(f"no COPY of {source} in stage {stage.name or stage.base}")


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=env)


def tool(name: str) -> str:
    """A tool installed in the test environment's scripts directory (the dev extra)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is missing: `make venv` installs it with the dev extra")
    return str(path)


# ---------------------------------------------------------------------------------------------
# lint


def test_every_target_has_a_dockerfile():
    found = {p.parent.name for p in [*IMAGES.glob("*/Dockerfile"), *IMAGES.glob("*/build-args")]}
    assert found == set(TARGETS)
    for target in TARGETS:
        path, args = target_build_args(target)
        declared = {
            i.args.partition("=")[0].strip() for stage in dockerfile(target).stages for i in stage.all("ARG")
        }
        unknown = set(args) - declared - set(dockerfile(target).global_args)
        assert path.is_file() and not unknown, f"{target}: build args {unknown} are not ARGs of {path}"


def test_build_script_passes_a_targets_build_args():
    result = run_script(str(IMAGES / "build.sh"), "--dry-run", "--build-arg", "X=1", "cuda")
    assert result.returncode == 0, result.stderr
    path, args = target_build_args("cuda")
    passed = " ".join(f"--build-arg {k}={v}" for k, v in args.items())
    assert result.stdout.splitlines() == [
        f"+ docker build {passed} --build-arg X=1 -f {path} -t localhost/cascade-rcnn-cuda:"
        f"{PYPROJECT['project']['version']} {ROOT}"
    ]


@pytest.mark.parametrize("target", TARGETS)
def test_hadolint_passes(target):
    config = ROOT / ".hadolint.yaml"
    extra = ["--config", str(config)] if config.exists() else []
    result = run_script(tool("hadolint"), *extra, str(target_build_args(target)[0]))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = run_script(tool("hadolint"), str(bad))
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base
    assert "DL3008" in result.stdout  # unpinned apt package


def test_shell_scripts_parse():
    scripts = sorted(IMAGES.rglob("*.sh"))
    assert {s.name for s in scripts} >= {"install.sh", "entrypoint.sh", "runtime-setup.sh", "build.sh"}
    for script in scripts:
        result = run_script("bash", "-n", str(script))
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"


# ---------------------------------------------------------------------------------------------
# what the components need: the package, kfp, the CLI, a pass-through entry point


def test_pyproject_declares_the_cli_and_the_pipeline_extra():
    assert PYPROJECT["project"]["scripts"]["cascade-rcnn"] == "cascade_rcnn.cli:main"
    pipeline = PYPROJECT["project"]["optional-dependencies"]["pipeline"]
    assert any(re.match(r"kfp\b(?!-)", req) for req in pipeline), pipeline


@pytest.mark.parametrize("target", TARGETS)
def test_the_package_is_installed_from_the_context_into_the_image(target):
    """install.sh runs once, in the image's own stage (cpu, cuda: one stage, so the 6 GB
    environment is never copied from stage to stage) or in a build stage whose environment the
    image copies (ascend: CANN's toolchain stays out of the image's layers)."""
    df = dockerfile(target)
    installing = [st for st in df.stages if any("images/install.sh" in src for src, _, _ in copies(st))]
    assert len(installing) == 1, f"{target}: one stage runs install.sh"
    (build,) = installing
    script = copied_to(build, "images/install.sh")
    source_dir = copied_to(build, "pyproject.toml").rsplit("/", 1)[0]
    # setuptools needs the readme pyproject names, and the sources under src/.
    assert copied_to(build, PYPROJECT["project"]["readme"]) == f"{source_dir}/README.md"
    assert copied_to(build, "src") == f"{source_dir}/src"
    runs = [i.args for i in build.all("RUN") if script in i.args]
    assert len(runs) == 1 and f"{script} {source_dir}" in runs[0], runs

    extras = build.args()["PACKAGE_EXTRAS"].split(",")
    assert "pipeline" in extras, "the components run with install_kfp_package=False: kfp must be in"
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    for required in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        assert build.args().get(required), f"{target}: ARG {required} needs a pinned default"

    # The image has the environment install.sh made (its own, or copied from the build stage), and
    # puts it first on PATH, so the components' `python3` and the `cascade-rcnn` command are the
    # environment's.
    venv = build.env()["VENV"]
    if build is not df.final:
        assert len(df.stages) == 2, "a build stage and a runtime stage"
        assert any(
            flags.get("from") == build.name and src == [venv] and dest == venv
            for src, dest, flags in copies(df.final)
        )
    else:
        assert len(df.stages) == 1, f"{target}: one stage"
    assert df.final.env()["PATH"].startswith(f"{venv}/bin:")


def test_install_script_checks_what_the_components_import():
    text = (IMAGES / "install.sh").read_text()
    assert "import cascade_rcnn" in text and "import kfp" in text
    assert '"$VENV/bin/cascade-rcnn" --help' in text
    assert "set -euo pipefail" in text  # a failed check fails the build


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_passes_the_command_through_and_cmd_runs_the_cli(target):
    final = dockerfile(target).final
    (entrypoint_ins,) = final.all("ENTRYPOINT")
    (cmd_ins,) = final.all("CMD")
    entrypoint = exec_form(entrypoint_ins)
    # kfp.local's DockerRunner passes the component's `sh -c ...` as the command, after the
    # ENTRYPOINT: it must be our pass-through script and nothing else.
    assert entrypoint == [copied_to(final, "images/entrypoint.sh")]
    cmd = exec_form(cmd_ins)
    assert cmd[0] in PYPROJECT["project"]["scripts"], cmd


def test_entrypoint_runs_its_arguments_unchanged():
    entrypoint = str(IMAGES / "entrypoint.sh")
    env = {**os.environ, "CANN_SET_ENV_SCRIPTS": "/nonexistent/set_env.sh"}
    result = run_script(
        entrypoint, sys.executable, "-c", "import sys; print(sys.argv[1:])", "a", "b c", env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['a', 'b c']"
    # The shape of a KFP component's command, and its exit status.
    result = run_script(entrypoint, "sh", "-ec", 'echo "$0:$1"; exit 7', "prog", "arg", env=env)
    assert (result.returncode, result.stdout.strip()) == (7, "prog:arg")


def test_entrypoint_without_arguments_shows_the_cli_usage():
    # What `docker run IMAGE` does: CMD's `cascade-rcnn --help`, here from the test environment.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "CANN_SET_ENV_SCRIPTS": "/nonexistent/set_env.sh",
    }
    result = run_script(str(IMAGES / "entrypoint.sh"), env=env)
    assert result.returncode == 0, result.stderr
    assert "usage: cascade-rcnn" in result.stdout


def test_entrypoint_sources_the_first_cann_env_script_present(tmp_path):
    toolkit, nnae = tmp_path / "toolkit_set_env.sh", tmp_path / "nnae_set_env.sh"
    toolkit.write_text("export ASCEND_FROM=toolkit\nexport LD_LIBRARY_PATH=/toolkit/lib64:$LD_LIBRARY_PATH\n")
    nnae.write_text("export ASCEND_FROM=nnae\n")
    show = ["sh", "-c", 'echo "$ASCEND_FROM $LD_LIBRARY_PATH"']
    env = {**os.environ, "LD_LIBRARY_PATH": "/base"}
    env["CANN_SET_ENV_SCRIPTS"] = f"{tmp_path}/missing.sh {toolkit} {nnae}"
    assert run_script(str(IMAGES / "entrypoint.sh"), *show, env=env).stdout.split() == [
        "toolkit",
        "/toolkit/lib64:/base",
    ]
    env["CANN_SET_ENV_SCRIPTS"] = f"{tmp_path}/missing.sh {nnae}"
    assert run_script(str(IMAGES / "entrypoint.sh"), *show, env=env).stdout.split()[0] == "nnae"


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_a_numeric_non_root_user(target):
    final = dockerfile(target).final
    users = final.all("USER")
    assert users, "no USER: the image would run as root"
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1].args)
    assert match, f"USER {users[-1].args!r} is not numeric"
    assert int(match.group(1)) != 0 and int(match.group(2) or 1) != 0
    assert users[-1] is final.instructions[-3], "USER comes last, before ENTRYPOINT and CMD"
    # The user runtime-setup.sh creates is that uid.
    setup = copied_to(final, "images/runtime-setup.sh")
    assert any(f"{setup} {match.group(1)}" in i.args for i in final.all("RUN"))


@pytest.mark.parametrize("target", TARGETS)
def test_no_credentials_in_the_image(target):
    df = dockerfile(target)
    names = dict(df.global_args)
    for stage in df.stages:
        names.update(stage.args())
        names.update(stage.env())
    for name, value in names.items():
        assert not SECRET_NAME.search(name), f"{target}: {name} looks like a credential"
        assert not SECRET_VALUE.search(value), f"{target}: {name} holds a key"
    for script in IMAGES.rglob("*"):
        if script.is_file():
            assert not SECRET_VALUE.search(script.read_text()), script


@pytest.mark.parametrize("target", TARGETS)
def test_base_image_is_pinned(target):
    df = dockerfile(target)
    base = df.global_args["BASE_IMAGE"]
    image, _, tag = base.rpartition(":")
    assert image and "/" not in tag and tag not in ("", "latest"), f"{target}: BASE_IMAGE {base!r}"
    assert {s.base for s in df.stages} == {base}, "every stage starts from BASE_IMAGE"


# ---------------------------------------------------------------------------------------------
# version pins


def pins(target: str) -> dict[str, str]:
    args = dockerfile(target).install_stage.args()
    out = {"torch": args["TORCH_VERSION"], "torchvision": args["TORCHVISION_VERSION"]}
    if "TORCH_NPU_VERSION" in args:
        out["torch-npu"] = args["TORCH_NPU_VERSION"]
    return out


def pyproject_specifier(name: str, pyproject: dict = PYPROJECT) -> SpecifierSet:
    project = pyproject["project"]
    requirements = project["dependencies"] + [
        r for reqs in project["optional-dependencies"].values() for r in reqs
    ]
    for req in requirements:
        match = re.fullmatch(rf"{re.escape(name)}\s*([<>=!~].*)?", req.split(";")[0].strip())
        if match:
            return SpecifierSet(match.group(1) or "")
    raise AssertionError(f"pyproject.toml does not require {name}")


@pytest.mark.parametrize("target", TARGETS)
def test_pins_satisfy_pyproject_and_pair_with_each_other(target):
    pinned = pins(target)
    for name, version in pinned.items():
        assert Version(version) in pyproject_specifier(name), f"{target}: {name} {version} vs pyproject"
    torch, vision = Version(pinned["torch"]), Version(pinned["torchvision"])
    # torchvision 0.(N+15).M is the release built for torch 2.N.M (since torch 2.1).
    assert (vision.major, vision.minor, vision.micro) == (0, torch.minor + 15, torch.micro), pinned
    if "torch-npu" in pinned:
        assert Version(pinned["torch-npu"]).base_version == torch.base_version, pinned


def test_cpu_image_runs_the_torch_the_tests_run():
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^TORCH_PINS\s*\?=\s*(.+)$", makefile, re.M)
    assert match, "Makefile has no TORCH_PINS"
    made = dict(p.split("==") for p in match.group(1).split())
    assert made == {k: v for k, v in pins("cpu").items()}


@pytest.mark.parametrize("target", ASCEND_TARGETS)
def test_ascend_torch_npu_is_the_release_for_its_cann(target):
    base = dockerfile(target).global_args["BASE_IMAGE"]
    match = re.fullmatch(r"[\w./-]+/cann:(\d+\.\d+\.(?:rc\d+|\d+))-(910|910b|a3)-[\w.]+-py(3\.\d+)", base)
    assert match, f"BASE_IMAGE {base!r} is not a <cann>-<chip>-<os>-py<ver> CANN image"
    cann = match.group(1)
    assert cann in TORCH_NPU_FOR_CANN, f"no known torch_npu pairing for CANN {cann}"
    assert pins(target)["torch-npu"] in TORCH_NPU_FOR_CANN[cann]


def test_cuda_base_carries_the_pinned_torch():
    df = dockerfile("cuda")
    match = re.fullmatch(
        r"pytorch/pytorch:([\d.]+)-cuda(\d+)\.(\d+)-cudnn\d+-runtime", df.global_args["BASE_IMAGE"]
    )
    assert match, df.global_args["BASE_IMAGE"]
    assert match.group(1) == pins("cuda")["torch"]
    # The fallback index serves the build for the same CUDA.
    index = df.install_stage.args()["TORCH_INDEX_URL"]
    assert index.endswith(f"/cu{match.group(2)}{match.group(3)}"), index


def test_ascend_image_sets_the_npu_switches():
    env = dockerfile("ascend").final.env()
    assert env["TASK_QUEUE_ENABLE"] == "2"
    assert env["CPU_AFFINITY_CONF"] == "1"
    assert env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert 120 <= int(env["HCCL_CONNECT_TIMEOUT"]) <= 7200  # HCCL's accepted range, in seconds


# ---------------------------------------------------------------------------------------------
# the CANN environment check run in the Ascend build


def fake_toolkit(root: Path) -> dict[str, str]:
    """A CANN layout and the ENV the official CANN images set for it."""
    home = root / "ascend-toolkit" / "latest"
    for sub in ("lib64", "opp", "python/site-packages"):
        (home / sub).mkdir(parents=True)
    for lib in ("libascendcl.so", "libhccl.so"):
        (home / "lib64" / lib).touch()
    return {
        "PATH": os.environ["PATH"],
        "ASCEND_TOOLKIT_HOME": str(home),
        "ASCEND_OPP_PATH": str(home / "opp"),
        "LD_LIBRARY_PATH": f"{home}/lib64:/usr/local/Ascend/driver/lib64/common/:/usr/local/Ascend/driver/lib64/driver/:",
        "PYTHONPATH": f"{home}/python/site-packages:{home}/opp/built-in/op_impl/ai_core/tbe:",
    }


def test_cann_env_check_accepts_a_base_with_cann_as_env(tmp_path):
    df = dockerfile("ascend")
    check = copied_to(df.final, "images/ascend/check-cann-env.sh")
    assert any(check in i.args for i in df.final.all("RUN"))
    result = run_script("bash", str(IMAGES / "ascend" / "check-cann-env.sh"), env=fake_toolkit(tmp_path))
    assert result.returncode == 0, result.stderr


def test_cann_env_check_names_what_a_base_lacks(tmp_path):
    env = fake_toolkit(tmp_path)
    env["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"].split(":", 1)[1]  # the toolkit's lib64 gone
    del env["ASCEND_OPP_PATH"]
    result = run_script("bash", str(IMAGES / "ascend" / "check-cann-env.sh"), env=env)
    assert result.returncode == 1
    assert "ASCEND_OPP_PATH" in result.stderr
    assert "libascendcl.so is in no LD_LIBRARY_PATH directory" in result.stderr
    assert "driver" not in result.stderr  # the driver directories were still there


# ---------------------------------------------------------------------------------------------
# build context and build script


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = os.path.normpath(pattern.lstrip("!")).lstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_builds_copy_and_nothing_else():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = {"images/entrypoint.sh", "images/runtime-setup.sh", "images/install.sh"}
    for target in TARGETS:
        for stage in dockerfile(target).stages:
            for sources, _, flags in copies(stage):
                if "from" not in flags:
                    needed.update(sources)
    for source in sorted(needed):
        assert (ROOT / source).exists(), f"COPY of {source}, which is not in the repository"
        assert not dockerignored(source, patterns), f".dockerignore drops {source}, which a build copies"
        if (ROOT / source).is_dir():
            files = [p for p in (ROOT / source).rglob("*.py") if "__pycache__" not in p.parts]
            for file in files[:20]:
                assert not dockerignored(str(file.relative_to(ROOT)), patterns), file
    for kept_out in (
        ".venv/bin/python",
        ".git/config",
        "tests/test_images.py",
        "demo_out/report.html",
        "local_outputs/x",
        "pipelines/compiled/cascade_mask_rcnn_training.yaml",
        ".env",
        "src/cascade_rcnn/__pycache__/cli.cpython-311.pyc",
        "src/cascade_rcnn.egg-info/PKG-INFO",
    ):
        assert dockerignored(kept_out, patterns), f".dockerignore sends {kept_out}"


def test_dockerignore_matcher_follows_docker_rules():
    assert dockerignored("a/b/c.txt", ["a"])
    assert not dockerignored("a/b/c.txt", ["*", "!a/"])
    assert dockerignored("x/y/__pycache__/z.pyc", ["**/__pycache__"])
    assert not dockerignored("ab/c", ["a"])
    assert dockerignored("src/x.egg-info/PKG-INFO", ["src/*.egg-info"])


def test_build_script_names_images_as_the_compile_expects():
    result = run_script(
        str(IMAGES / "build.sh"),
        "--dry-run",
        "--engine",
        "podman",
        "--registry",
        "registry.example.com/ml/",
        "--tag",
        "1.2.3",
        "--build-arg",
        "TORCH_INDEX_URL=",
        "--push",
        "cpu",
        "ascend",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        f"+ podman build --build-arg TORCH_INDEX_URL= -f {IMAGES}/cpu/Dockerfile "
        f"-t registry.example.com/ml/cascade-rcnn-cpu:1.2.3 {ROOT}",
        "+ podman push registry.example.com/ml/cascade-rcnn-cpu:1.2.3",
        f"+ podman build --build-arg TORCH_INDEX_URL= -f {IMAGES}/ascend/Dockerfile "
        f"-t registry.example.com/ml/cascade-rcnn-ascend:1.2.3 {ROOT}",
        "+ podman push registry.example.com/ml/cascade-rcnn-ascend:1.2.3",
    ]


def test_build_script_defaults_and_errors():
    result = run_script(str(IMAGES / "build.sh"), "--dry-run")
    version = PYPROJECT["project"]["version"]
    assert result.returncode == 0, result.stderr
    assert [line.split(" -t ")[1].split()[0] for line in result.stdout.splitlines()] == [
        f"localhost/cascade-rcnn-cpu:{version}",
        f"localhost/cascade-rcnn-ascend:{version}",
    ]
    result = run_script(str(IMAGES / "build.sh"), "--dry-run", "gpu")
    assert result.returncode == 2 and "unknown target 'gpu'" in result.stderr
    assert "cpu ascend ascend-cann8.5 cuda" in result.stderr
