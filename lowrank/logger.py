"""A W&B run, or a stand-in with the same methods, so the training loop has no `if wandb:` branches."""
import logging
import netrc
import os
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0    # no network usually fails at once (DNS) or within this
INIT_TIMEOUT_S = 30.0    # wandb's own default (90 s) is what made runs hang; WANDB_INIT_TIMEOUT overrides


def wandb_base_url() -> str:
    """The server wandb.init will talk to: WANDB_BASE_URL, `wandb login --host`, or the default cloud.
    Read from wandb's settings singleton (does not start wandb's service process)."""
    from wandb.sdk import wandb_setup
    return wandb_setup.singleton().settings.base_url


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc()
    except (OSError, netrc.NetrcParseError):
        return False
    # `wandb login` stores the key under the server's host (api.forge.coreweave.com since wandb 0.31);
    # older logins used api.wandb.ai.
    return any(rc.authenticators(h) for h in (urlsplit(wandb_base_url()).netloc, "api.wandb.ai"))


def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to host:port be opened within `timeout` s? DNS failure counts as no."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:    # gaierror, refused, unreachable, timeout
        return False


def _probe_target(base_url: str) -> tuple[str, int]:
    """The host, port that must accept a TCP connection for `base_url`: the server, or the proxy to it."""
    url = urlsplit(base_url)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


class NullLogger:
    def log(self, metrics: dict, step: int | None = None) -> None: ...
    def summary(self, metrics: dict) -> None: ...
    def finish(self) -> None: ...


class WandbLogger:
    """Online with an API key (env WANDB_API_KEY or ~/.netrc), otherwise offline into the run directory;
    `logger.mode` forces either. A run never hangs on W&B: if online mode cannot reach the server
    quickly, or wandb.init fails (bad key, timeout), it logs offline instead, with one warning."""

    def __init__(self, cfg_logger, run_dir: Path, config: dict, group: str | None, name: str):
        import wandb
        mode = cfg_logger.mode or ("online" if has_wandb_key() else "offline")
        settings = {"silent": True, "console": "off"}
        if "WANDB_INIT_TIMEOUT" not in os.environ:
            settings["init_timeout"] = INIT_TIMEOUT_S

        def init(mode: str):
            return wandb.init(project=cfg_logger.project, entity=cfg_logger.entity, group=group, name=name,
                              dir=str(run_dir), config=config, mode=mode, reinit="create_new",
                              settings=wandb.Settings(**settings))

        if mode != "online":
            self.run = init(mode)
            return
        # The probe makes the common no-network case (DNS fails, connect refused or times out) cost
        # seconds; init_timeout bounds the rest (server up but slow, bad key).
        host, port = _probe_target(wandb_base_url())
        if not reachable(host, port):
            why = f"cannot connect to {host}:{port}"
        else:
            try:
                self.run = init("online")
                return
            except Exception as e:    # CommError (timeout), AuthenticationError, UsageError (no key), ...
                first_line = (str(e).strip().splitlines() or [""])[0]
                why = f"wandb.init failed: {type(e).__name__}: {first_line}"
        log.warning("W&B online unavailable (%s); logging offline instead. Upload later with "
                    "`wandb sync %s/wandb/offline-run-*`", why, run_dir)
        self.run = init("offline")

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if not isinstance(v, (list, dict)):
                self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg_logger, run_dir: Path, config: dict, group: str | None, name: str):
    if cfg_logger.name == "none":
        return NullLogger()
    return WandbLogger(cfg_logger, run_dir, config, group, name)
