"""Build glue: generate the selma.v1 protobuf/gRPC stubs from protos/ before packaging.

The stubs are written into shared/selma/v1/ (gitignored) whenever setuptools runs this
file, so `pip install -e .` and `pip wheel .` both produce them and nothing generated is
ever committed.  `python setup.py gen` only regenerates them.  Everything else about the package lives in pyproject.toml.
"""

from __future__ import annotations

import pathlib
import sys

from setuptools import find_namespace_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "shared"


def generate_stubs() -> None:
    """Run grpc_tools.protoc over protos/selma/v1/*.proto into shared/selma/v1/."""
    import importlib.resources

    from grpc_tools import protoc  # build requirement, pinned in pyproject.toml

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "selma" / "v1").glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT / 'selma' / 'v1'}")
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT_ROOT}",
        f"--pyi_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))
    init = OUT_ROOT / "selma" / "v1" / "__init__.py"
    init.write_text('"""Generated from protos/selma/v1 at build time. Do not edit; do not commit."""\n')


# Not packages: byte-code caches (every other folder under a package is one, data folders included).
_NOT_PACKAGES = ["__pycache__", "*.__pycache__"]


def _subpackages(path: pathlib.Path) -> list[str]:
    """Every folder under ``path`` as a (namespace) package: data folders without ``__init__.py``
    (``selma_evaluation/data``, ``selma_shapesworld/weights/base/unet``, ...) are declared too, so
    setuptools ships their files as package data instead of warning "Package would be ignored"."""
    return find_namespace_packages(str(path), exclude=_NOT_PACKAGES)


def packages() -> tuple[list[str], dict[str, str]]:
    """The library (shared/selma), every service (services/<name>/selma_<name>) and testbed (testbeds/<name>/selma_<name>).

    The folder is the import name, so the tree shows the import graph.
    """
    pkgs = ["selma"] + [f"selma.{p}" for p in _subpackages(OUT_ROOT / "selma")]
    if "selma.v1" not in pkgs:
        pkgs.append("selma.v1")  # generated during build_py; declared up front so wheels include it
    package_dir = {"selma": "shared/selma"}
    for pkg in sorted([*ROOT.glob("services/*/selma_*"), *ROOT.glob("testbeds/*/selma_*")]):
        if (pkg / "__init__.py").exists():
            package_dir[pkg.name] = str(pkg.relative_to(ROOT))
            pkgs.append(pkg.name)
            pkgs += [f"{pkg.name}.{p}" for p in _subpackages(pkg)]
    return pkgs, package_dir


if __name__ == "__main__":
    # Every setuptools entry (egg_info, editable_wheel, build_py, sdist) runs this file, and
    # egg_info already needs the selma.v1 package directory: generate first, always (0.1 s).
    generate_stubs()
    if len(sys.argv) > 1 and sys.argv[1] == "gen":
        sys.exit(0)
    _pkgs, _dirs = packages()
    setup(packages=_pkgs, package_dir=_dirs)
