"""Without GPUD_ETCD_ENDPOINTS nothing of fleet mode is imported: the composition root builds both apps and
serves requests with no gpud.fleet module (nor aiohttp's etcd code path) loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.daemonproc import REPO

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from aiohttp.test_utils import TestClient, TestServer
    from gpud.api.app import make_public_app
    from gpud.daemon.services import create_services
    from gpud.settings import load

    base = Path(sys.argv[1])
    settings = load(environ={
        "GPUD_GPU_BACKEND": "static", "GPU_DEVICE_IDS": "0", "GPUD_RUNTIME": "process",
        "GPUD_STATE_DIR": str(base / "state"), "MODEL_CACHE_DIR": str(base / "models"),
        "GPUD_PRESETS_FILE": sys.argv[2], "INTERNAL_API_KEY": "k", "GPUD_ADMIN_SOCKET": str(base / "s.sock"),
    }, config_file=base / "none.yaml")

    async def main():
        services = create_services(settings)
        assert services.fleet is None
        async with TestClient(TestServer(make_public_app(services.for_api()))) as client:
            response = await client.get("/api/sessions/nope", headers={"X-API-Key": "k"})
            assert response.status == 404, response.status
            response = await client.get("/api/fleet", headers={"X-API-Key": "k"})
            assert response.status == 404, response.status
    asyncio.run(main())
    loaded = sorted(m for m in sys.modules if m.startswith(("gpud.fleet", "gpud.api.fleet", "gpud.api.routes.fleet")))
    print("loaded:", loaded)
    sys.exit(1 if loaded else 0)
    """
)


def test_single_host_mode_never_imports_the_fleet_code(tmp_path: Path) -> None:
    presets = REPO / "gpud" / "settings" / "defaults" / "models.yaml"
    (tmp_path / "none.yaml").write_text("{}\n")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(presets)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded: []" in done.stdout
