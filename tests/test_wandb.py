"""train.py with wandb_log=True in offline mode: the run directory records the config and the metrics."""

import pytest

wandb = pytest.importorskip("wandb")  # in requirements-dev.txt; the guard is for bare checkouts


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, writing only under tmp_path; its service process is stopped afterwards."""
    folder = tmp_path / "wandb_home"
    folder.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": folder, "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    env.update({k: folder / k.lower() for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")})
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield folder
    wandb.teardown()  # the run has finished; stop the background service so nothing outlives the test


def test_offline_run_records_config_and_metrics(tiny_cfg, offline_wandb):
    import train

    result = train.train(tiny_cfg(wandb_log=True, wandb_project="test", max_iters=10, eval_interval=5))
    wandb.teardown()  # finish() can return before the service has flushed the run's file: wait for it
    runs = list(offline_wandb.glob("wandb/offline-run-*"))
    assert len(runs) == 1, list(offline_wandb.rglob("*"))
    run = runs[0]
    # the run's records (config, history, summary) are protobufs in run-<id>.wandb; older wandb
    # releases also write files/config.yaml and files/wandb-summary.json
    written = b"".join(
        p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix in (".wandb", ".yaml", ".json")
    )
    missing = [k for k in ("n_layer", "norm_position", "tokens_per_step") if k.encode() not in written]
    assert not missing, f"config keys not in the wandb run: {missing}"
    missing = [k for k in ("loss", "val_loss", "train_loss", "lr", "tokens_per_sec") if k.encode() not in written]
    assert not missing, f"metrics not in the wandb run: {missing}"
    assert result["step"] == 10


class FakeRun:
    def __init__(self, **kwargs):
        self.id = kwargs.get("id") or "run-of-the-first-start"
        self.logged = []

    def log(self, record, step):
        self.logged.append(step)

    def finish(self):
        pass


def test_resume_continues_the_same_wandb_run(tiny_cfg, monkeypatch):
    """The checkpoint keeps the W&B run's id; a resume passes it back to wandb.init, so the run goes on."""
    import train
    from gpt_residual import checkpoint

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or FakeRun(**kwargs))
    cfg = tiny_cfg(wandb_log=True, max_iters=4, eval_interval=2)
    train.train(cfg)
    assert "id" not in calls[0]  # a new run: wandb picks the id
    assert checkpoint.load(f"{cfg.out_dir}/ckpt.pt")["wandb_run_id"] == "run-of-the-first-start"
    train.train(tiny_cfg(wandb_log=True, max_iters=6, eval_interval=2, init_from="resume"))
    assert calls[1]["id"] == "run-of-the-first-start" and calls[1]["resume"] in ("allow", "must")
    train.train(tiny_cfg(max_iters=8, eval_interval=2, init_from="resume"))  # without wandb: the id is kept
    train.train(tiny_cfg(wandb_log=True, max_iters=10, eval_interval=2, init_from="resume"))
    assert len(calls) == 3 and calls[2]["id"] == "run-of-the-first-start"
