"""Packaging for gpud (the daemon) and gpuctl (its CLI)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(
    r'__version__ = "([^"]+)"', Path(__file__).with_name("gpud").joinpath("__init__.py").read_text()
).group(1)  # type: ignore[union-attr]


def _files(folder: str, pattern: str) -> list[str]:
    """Files of a repository folder, as the paths relative to setup.py that data_files takes."""
    here = Path(__file__).resolve().parent
    return sorted(str(p.relative_to(here)) for p in (here / folder).glob(pattern) if p.is_file())


setup(
    name="gpud",
    version=VERSION,
    description="Host-level GPU task service: sessions, one-off tasks, SSE streaming, systemd-native",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gpud", "gpud.*", "gpuctl", "gpuctl.*"]),
    package_data={"gpud": ["settings/defaults/*.yaml", "py.typed"], "gpuctl": ["py.typed"]},
    # The example workers and demo model, for `gpud run --dev` outside a checkout (gpud/daemon/examples.py finds
    # them under <prefix>/share/gpud/examples; the worker image bakes its own copy of the workers).
    data_files=[
        ("share/gpud/examples/workers", _files("examples/workers", "*.py")),
        ("share/gpud/examples/models/demo-text", _files("examples/models/demo-text", "*")),
    ],
    install_requires=[
        "aiohttp>=3.9",
        "aiohttp-sse>=2.2",
        "aiodocker>=0.23",
        "podman>=4.3",
        # NVIDIA's own bindings (the `pynvml` module); the `pynvml` package is deprecated and warns at import.
        "nvidia-ml-py>=12.535",
        "pyyaml>=6.0",
        "click>=8.1",
        "sdnotify>=0.3.2",
        "prometheus-client>=0.19",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-aiohttp>=1.0",
            "pytest-asyncio>=0.23",
            "pytest-timeout>=2.2",
            "aiohttp-sse-client2>=0.3",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "mypy>=1.10",
            "types-PyYAML",
            "types-requests",
        ]
    },
    entry_points={
        "console_scripts": [
            "gpud = gpud.__main__:main",
            "gpuctl = gpuctl.cli:main",
        ]
    },
)
