"""``spherecast render RUN [--products] [--regions]``: re-rendering replaces a run's maps/ whole, and bad input
changes nothing on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.config import load_config
from core.runs import list_runs, read_manifest, run_name
from pipelines.cli import main
from pipelines.tasks import rerender_task
from tests.serve.conftest import INIT, make_forecast, publish_run

RUN = run_name(INIT)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A published run under ``tmp_path/forecasts`` with global and arctic maps."""
    publish_run(tmp_path / "forecasts", make_forecast(leads=2), dpi=30)
    return tmp_path


def test_rerender_draws_exactly_the_asked_products_and_regions_and_replaces_maps(site: Path) -> None:
    config = load_config(env={}, overrides={"paths": {"root": str(site)}, "render": {
        "products": ["geopotential_500"], "regions": ["global", "europe"], "animations": False, "dpi": 30}})
    rerender_task.fn(config, RUN)
    run = site / "forecasts" / RUN
    drawn = {(p.parts[-3], p.parts[-2]) for p in (run / "maps").rglob("*.png")}
    assert drawn == {("geopotential_500", "global"), ("geopotential_500", "europe")}  # arctic and wind maps gone
    assert {k for k in read_manifest(run)["files"] if k.startswith("maps/")} == {
        str(p.relative_to(run)) for p in (run / "maps").rglob("*") if p.is_file()}
    assert list_runs(site / "forecasts") == [RUN] and not list((site / "forecasts").glob(".tmp-*"))


def test_an_unknown_product_fails_and_leaves_the_run_as_it_was(site: Path) -> None:
    run = site / "forecasts" / RUN
    before = tree_digest(run)
    config = load_config(env={}, overrides={"paths": {"root": str(site)}, "render": {"products": ["z500_t850"]}})
    with pytest.raises(ValueError, match="temperature_850"):
        rerender_task.fn(config, RUN)
    assert tree_digest(run) == before
    assert not list((site / "forecasts").glob(".tmp-*"))


@pytest.mark.parametrize(("argv", "words"), [
    (["render", RUN, "--regions", "global,nowhere"], ["nowhere"]),
    (["render"], ["needs one run name"]),
    (["render", RUN, "--run", "20000101T06"], ["needs one run name"]),
])
def test_bad_render_requests_exit_2_before_anything_runs(site: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], argv: list[str],
                                                       words: list[str]) -> None:
    monkeypatch.setenv("SPHERECAST_PATHS__ROOT", str(site))
    before = tree_digest(site / "forecasts")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert tree_digest(site / "forecasts") == before
