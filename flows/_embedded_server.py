"""Prefect's embedded server (no PREFECT_API_URL) never outlives the CLI that started it.

Prefect starts it on first use as `SubprocessASGIServer()` and stops it at exit (atexit), which a SIGKILLed
CLI never reaches: each kill left a ~200 MB uvicorn server behind, with the killed run's leases in its
memory. `install()` registers a subclass under the key Prefect looks up (as `prefect.testing`'s harness
does), so the server Prefect starts is this one: started with the CLI's environment minus hotvm's secrets,
and guarded by a watchdog (hotvm/watchdog.py) that ends it when the CLI dies. Importing this module costs
~2.5 s (Prefect's server code): import it only when the embedded server will be used.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import get_current_settings

from hotvm.child_env import child_env, withheld
from hotvm.watchdog import guard


class GuardedServer(SubprocessASGIServer):
    """Prefect 3.9's SubprocessASGIServer (the same command), plus a watchdog and no hotvm secrets."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        settings = get_current_settings().to_environment_variables(exclude_unset=True)
        server = subprocess.Popen(
            args=[
                sys.executable, "-m", "uvicorn",
                "--app-dir", str(prefect.__module_path__.parent),
                "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on",
            ],  # fmt: skip
            env=child_env(
                PREFECT_UI_ENABLED="0",
                PREFECT__SERVER_EPHEMERAL="1",
                PREFECT__SERVER_FINAL="1",
                **{k: v for k, v in settings.items() if k not in withheld()},
            ),
        )
        self.watchdog = guard(server)  # keep it: its stdin pipe must stay open while we live
        return server


def install() -> None:
    """Make the embedded server Prefect starts (lazily, on first use) a guarded one."""
    current = SubprocessASGIServer._instances.get(None)
    if current is not None and (current.running or isinstance(current, GuardedServer)):
        return
    SubprocessASGIServer._instances.pop(None, None)
    GuardedServer(None)  # registers itself under the default key
