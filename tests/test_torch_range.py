"""The supported torch range cannot drift from what CI tests.

CI runs the suite on the newest supported torch (Makefile TORCH_PINS, `make test`) and the
model-level tests on the oldest (COMPAT_TORCH_PINS, `make test-compat`). Every torch, torchvision
and torch-npu pin in images/ must lie between the two, pyproject.toml's floor must be the oldest
and its range must admit the newest, and the README's image table must say what each image runs.
The checks read a repository root, so the tests below also move pins in a copy and watch them fail.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from packaging.version import Version
from test_images import parse_dockerfile, pyproject_specifier, target_build_args

ROOT = Path(__file__).resolve().parents[1]
# build arg -> package; torch-npu's version is the torch it is built for, plus a .postN.
PIN_ARGS = {"TORCH_VERSION": "torch", "TORCHVISION_VERSION": "torchvision", "TORCH_NPU_VERSION": "torch-npu"}


@dataclass(frozen=True)
class Pin:
    target: str  # images/TARGET
    package: str
    version: Version
    source: Path  # the file that sets it, relative to the root

    @property
    def torch_release(self) -> Version:
        """The version to hold against the tested range (torch-npu 2.5.1.post1 -> 2.5.1)."""
        return Version(self.version.base_version)


def ci_torch_range(root: Path) -> dict[str, tuple[Version, Version]]:
    """package -> (oldest, newest) that CI installs, from the Makefile."""
    text = (root / "Makefile").read_text()

    def pins(var: str) -> dict[str, Version]:
        match = re.search(rf"^{var}\s*\?=\s*(.+)$", text, re.M)
        assert match, f"Makefile has no {var} line"
        return {k: Version(v) for k, v in (p.split("==") for p in match.group(1).split())}

    low, high = pins("COMPAT_TORCH_PINS"), pins("TORCH_PINS")
    assert set(low) == set(high) == {"torch", "torchvision"}, (low, high)
    return {name: (low[name], high[name]) for name in low}


def image_pins(root: Path) -> list[Pin]:
    """Every torch-stack pin of every image target, with the file it comes from (a target's
    build-args file where it sets the argument, else the Dockerfile's default)."""
    out = []
    for target_dir in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
        if not any((target_dir / name).is_file() for name in ("Dockerfile", "build-args")):
            continue
        dockerfile, build_args = target_build_args(target_dir.name, root / "images")
        args = parse_dockerfile(dockerfile, build_args).install_stage.args()
        for arg, package in PIN_ARGS.items():
            if arg in args:
                source = target_dir / "build-args" if arg in build_args else dockerfile
                out.append(Pin(target_dir.name, package, Version(args[arg]), source.relative_to(root)))
    return out


def range_problems(root: Path) -> list[str]:
    """What lies outside the tested range, each naming its file; empty when all holds."""
    tested = ci_torch_range(root)
    problems = []
    for pin in image_pins(root):
        low, high = tested["torchvision" if pin.package == "torchvision" else "torch"]
        if not low <= pin.torch_release <= high:
            problems.append(
                f"{pin.source}: images/{pin.target} pins {pin.package} {pin.version}, outside the tested "
                f"range {low} .. {high} (Makefile COMPAT_TORCH_PINS .. TORCH_PINS)"
            )
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    for name, tested_as in (("torch", "torch"), ("torchvision", "torchvision"), ("torch-npu", "torch")):
        spec = pyproject_specifier(name, pyproject)
        low, high = tested[tested_as]
        floors = [Version(s.version) for s in spec if s.operator == ">="]
        if floors != [low]:
            problems.append(
                f"pyproject.toml: {name} {spec or '(no range)'} must have the floor >={low}, the oldest "
                "version CI tests (Makefile COMPAT_TORCH_PINS)"
            )
        if name != "torch-npu" and high not in spec:
            problems.append(
                f"pyproject.toml: {name} {spec} excludes {high}, the version CI tests (Makefile TORCH_PINS)"
            )
    return problems


def test_images_and_pyproject_lie_in_the_ci_torch_range():
    assert range_problems(ROOT) == []
    # Both ends are what some image runs: the oldest is not older than any image needs.
    tested = ci_torch_range(ROOT)
    torches = {p.torch_release for p in image_pins(ROOT) if p.package == "torch"}
    assert min(torches) == tested["torch"][0] and max(torches) == tested["torch"][1], torches


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "images", tmp_path / "images")
    assert range_problems(tmp_path) == []
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} has no {old!r}"
    path.write_text(text.replace(old, new, 1))


def only_problem(root: Path) -> str:
    problems = range_problems(root)
    assert len(problems) == 1, problems
    return problems[0]


def test_a_dockerfile_pin_below_the_range_fails_naming_the_file(copy):
    edit(
        copy / "images/ascend/Dockerfile",
        "ARG TORCH_NPU_VERSION=2.5.1.post1",
        "ARG TORCH_NPU_VERSION=2.4.0.post4",
    )
    problem = only_problem(copy)
    assert problem.startswith("images/ascend/Dockerfile: images/ascend pins torch-npu 2.4.0.post4"), problem
    assert "2.5.1 .. 2.14.1" in problem


def test_a_build_args_pin_above_the_range_fails_naming_the_file(copy):
    edit(copy / "images/cuda/build-args", "TORCHVISION_VERSION=0.20.1", "TORCHVISION_VERSION=0.30.0")
    assert only_problem(copy).startswith("images/cuda/build-args: images/cuda pins torchvision 0.30.0")


def test_an_inherited_default_outside_the_range_names_the_dockerfile(copy):
    # images/cpu's torch comes from its Dockerfile; cuda's from its build-args: both files are named.
    edit(copy / "images/cpu/Dockerfile", "ARG TORCH_VERSION=2.14.1", "ARG TORCH_VERSION=2.15.0")
    assert only_problem(copy).startswith("images/cpu/Dockerfile: images/cpu pins torch 2.15.0")


def test_a_new_image_outside_the_range_fails(copy):
    (copy / "images/ascend-old").mkdir()
    (copy / "images/ascend-old/build-args").write_text(
        "DOCKERFILE=images/ascend/Dockerfile\nTORCH_VERSION=2.1.0\nTORCHVISION_VERSION=0.16.0\n"
        "TORCH_NPU_VERSION=2.1.0.post13\n"
    )
    problems = range_problems(copy)
    assert len(problems) == 3 and all(p.startswith("images/ascend-old/build-args: ") for p in problems)


def test_the_pyproject_floor_must_be_the_oldest_tested_torch(copy):
    edit(copy / "pyproject.toml", '"torch>=2.5.1,', '"torch>=2.4,')
    assert only_problem(copy).startswith("pyproject.toml: torch <2.15,>=2.4 must have the floor >=2.5.1")


def test_moving_the_tested_floor_alone_fails(copy):
    # CI testing a newer oldest torch than pyproject promises (and the images run) is caught too.
    edit(copy / "Makefile", "COMPAT_TORCH_PINS ?= torch==2.5.1 torchvision==0.20.1",
         "COMPAT_TORCH_PINS ?= torch==2.6.0 torchvision==0.21.0")  # fmt: skip
    problems = range_problems(copy)
    assert any(p.startswith("pyproject.toml: torch <2.15,>=2.5.1 must") for p in problems), problems
    assert any(p.startswith("images/ascend/Dockerfile: images/ascend pins torch 2.5.1") for p in problems)


def test_the_pyproject_range_must_admit_the_newest_tested_torch(copy):
    edit(copy / "pyproject.toml", '"torch>=2.5.1,<2.15"', '"torch>=2.5.1,<2.14"')
    assert only_problem(copy).startswith("pyproject.toml: torch <2.14,>=2.5.1 excludes 2.14.1")


def readme_image_rows(readme: str) -> dict[str, str]:
    """images/TARGET -> its row in the README's image table."""
    rows = {}
    for line in readme.splitlines():
        match = re.match(r"\|\s*`images/([\w.-]+)`", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_readme_table_lists_every_image_with_its_torch_stack_and_cann():
    rows = readme_image_rows((ROOT / "README.md").read_text())
    pins = image_pins(ROOT)
    assert set(rows) == {p.target for p in pins}
    for pin in pins:
        cell = f"{pin.package} {pin.version}"
        assert cell in rows[pin.target], f"README.md's row for images/{pin.target} lacks {cell!r}"
    for target, row in rows.items():
        dockerfile = parse_dockerfile(*target_build_args(target))
        base = dockerfile.global_args["BASE_IMAGE"]
        assert f"`{base}`" in row, f"README.md's row for images/{target} lacks its base {base}"
        cann = re.search(r"/cann:(\d+\.\d+\.(?:rc\d+|\d+))-", base)
        if cann:
            assert f"CANN {cann.group(1).upper()}" in row, (
                f"README.md: images/{target} runs CANN {cann.group(1)}"
            )
        cuda = re.search(r"-cuda(\d+\.\d+)-", base)
        if cuda:
            assert f"CUDA {cuda.group(1)}" in row, f"README.md: images/{target} runs CUDA {cuda.group(1)}"
