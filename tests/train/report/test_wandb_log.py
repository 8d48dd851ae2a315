"""The report's wandb upload: only when asked, never in report.md, a failure said in one line."""
from __future__ import annotations

from tests.train.report.test_command import make_run


def test_wandb_is_written_only_when_asked(tmp_path, capsys, monkeypatch):
    """By default nothing of wandb is written and report.md has no wandb line; with --wandb a failed upload
    is one line on the console (what wandb raised), still not in report.md, and the exit status ignores it."""
    import wandb

    from emformer.train.cli import main

    sweep = tmp_path / "small"
    for seed in (0, 1):
        make_run(sweep / "runs", ["data.source=fresh", "wandb.mode=offline"], seed)
    assert main(["report", str(sweep), "--out", str(tmp_path / "plain")]) == 0
    assert "wandb:" not in capsys.readouterr().out
    assert not list((tmp_path / "plain").rglob("*wandb*"))
    assert "wandb" not in (tmp_path / "plain" / "report.md").read_text().replace(str(tmp_path), "")

    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    assert main(["report", str(sweep), "--out", str(tmp_path / "asked"), "--wandb"]) == 0
    assert "wandb: figures not logged to wandb (CommError: no network)" in capsys.readouterr().out
    assert "wandb" not in (tmp_path / "asked" / "report.md").read_text().replace(str(tmp_path), "")
