"""W&B logger: a key with no reachable server must fall back to offline quickly, never hang or raise."""
import logging
import socket
from urllib.parse import urlsplit

import pytest
from omegaconf import OmegaConf

from lowrank import logger as lg

FAKE_KEY = "0123456789abcdef" * 2 + "01234567"    # 40 chars, the shape of a real key


def wandb_cfg(mode=None):
    # Same fields as conf/logger/wandb.yaml.
    return OmegaConf.create({"name": "wandb", "project": "lowrank", "entity": None, "mode": mode,
                             "group": None})


def closed_port() -> int:
    """A local port with nothing listening: bound once by us to pick it, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def wandb_env(monkeypatch):
    """A fake key and a base URL at a closed local port; wandb re-reads its settings from this env."""
    import wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    for var in ("WANDB_MODE", "WANDB_INIT_TIMEOUT", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    wandb.teardown()    # the settings singleton caches env from its first use
    yield
    wandb.teardown()


def assert_offline_fallback(lgr, run_dir, caplog):
    assert isinstance(lgr, lg.WandbLogger)
    assert lgr.run.settings.mode == "offline"
    warnings = [r for r in caplog.records if r.name == "lowrank.logger" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "offline" in msg and f"wandb sync {run_dir}/wandb/offline-run-*" in msg and "\n" not in msg
    lgr.log({"train/loss": 1.0}, step=1)
    lgr.summary({"eval/accuracy": 0.5, "per_class": [1, 2]})
    lgr.finish()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    return msg


@pytest.mark.parametrize("mode", [None, "online"])    # online chosen because a key is present, or forced
def test_unreachable_server_falls_back_to_offline(wandb_env, tmp_path, caplog, mode):
    caplog.set_level(logging.WARNING, logger="lowrank.logger")
    run_dir = tmp_path / "run"
    run_dir.mkdir()    # the trainer creates it before the logger
    lgr = lg.make_logger(wandb_cfg(mode), run_dir, {"lr": 1e-3}, group=None, name="run")
    assert "cannot connect to 127.0.0.1:" in assert_offline_fallback(lgr, run_dir, caplog)


def test_failed_online_init_falls_back_to_offline(wandb_env, tmp_path, caplog, monkeypatch):
    """Server reachable but wandb.init raises (e.g. the key is rejected): still offline, one warning."""
    import wandb
    real_init = wandb.init

    def init(*args, mode=None, **kwargs):
        if mode == "online":
            raise wandb.errors.AuthenticationError("API key is invalid\nmore detail")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(lg, "reachable", lambda host, port, timeout=lg.PROBE_TIMEOUT_S: True)
    monkeypatch.setattr(wandb, "init", init)
    caplog.set_level(logging.WARNING, logger="lowrank.logger")
    run_dir = tmp_path / "run"
    run_dir.mkdir()    # the trainer creates it before the logger
    lgr = lg.make_logger(wandb_cfg(), run_dir, {}, group="g", name="run")
    assert "AuthenticationError: API key is invalid" in assert_offline_fallback(lgr, run_dir, caplog)


def test_offline_mode_never_probes(wandb_env, tmp_path, caplog, monkeypatch):
    def no_probe(*a, **k):
        raise AssertionError("offline mode must not touch the network")
    monkeypatch.setattr(lg, "reachable", no_probe)
    caplog.set_level(logging.WARNING, logger="lowrank.logger")
    lgr = lg.make_logger(wandb_cfg("offline"), tmp_path, {}, group=None, name="run")
    assert lgr.run.settings.mode == "offline"
    lgr.finish()
    assert not [r for r in caplog.records if r.name == "lowrank.logger"]


def test_reachable_closed_and_listening_port():
    assert not lg.reachable("127.0.0.1", closed_port(), timeout=1.0)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        assert lg.reachable("127.0.0.1", srv.getsockname()[1], timeout=1.0)


def test_reachable_dns_failure_is_unreachable():
    assert not lg.reachable("no-such-host.invalid", 443, timeout=1.0)    # .invalid never resolves (RFC 2606)


def test_probe_target_uses_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert lg._probe_target("https://api.wandb.ai") == ("api.wandb.ai", 443)
    assert lg._probe_target("http://127.0.0.1:8080") == ("127.0.0.1", 8080)
    monkeypatch.setenv("https_proxy", "http://proxy.local:3128")
    assert lg._probe_target("https://api.wandb.ai") == ("proxy.local", 3128)


def test_null_logger():
    lgr = lg.make_logger(OmegaConf.create({"name": "none"}), None, {}, None, "run")
    lgr.log({"a": 1}); lgr.summary({"a": 1}); lgr.finish()


@pytest.mark.parametrize("machine, found", [("BASE", True), ("api.wandb.ai", True), ("example.com", False)])
def test_netrc_key_for_wandb_host(monkeypatch, tmp_path, machine, found):
    """`wandb login` files the key under the server's host (which depends on the wandb version)."""
    import wandb
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    wandb.teardown()
    try:
        host = urlsplit(lg.wandb_base_url()).netloc if machine == "BASE" else machine
        rc = tmp_path / ".netrc"
        rc.write_text(f"machine {host}\n  login user\n  password {FAKE_KEY}\n")
        rc.chmod(0o600)
        assert lg.has_wandb_key() is found
    finally:
        wandb.teardown()
