"""The best a forecast can do on the shallow-water planet: its own solver from the exact state.

The planet is stirred at random every 6 h (``ingest.planet``), and no analysis shows the kicks to come,
so even a perfect model of its dynamics has an error floor. This bench measures it on the skill bench's
held-out test period (same stores, same relative error, DESIGN §4), from ``--starts`` initial times:

* **unstirred** — the planet's solver from the exact state (spectral state and Adams–Bashforth history),
  run without stirring: the perfect model of the deterministic part;
* **truncated** — the same solver from the state the analyses show: every degree the store's grid cannot
  hold set to zero, and no Adams–Bashforth history (the scheme restarts as the planet's spin-up does). A model
  sees only this, so it is the perfect deterministic model at the model's own information (a learned model may
  still beat it by guessing the unseen scales from the seen ones);
* **ensemble mean** — the mean of ``--members`` runs stirred with other seeds' kicks: what the best
  mean-squared-error forecast (the expected state) approaches; "infinite" removes the sampling error of
  a finite ensemble (mean ensemble variance / members) from its mean squared error;
* persistence and climatology from the same initial times.

The initial states come from re-running the planet (about 5 min of solver for the default 487 days),
and each is checked against the store before it is used, so the bound is scored on the store's truth.
With ``--skill-report`` (the JSON of ``benches/skill_swe.py``) the SFNO's figures print beside it, and
the fraction of the attainable improvement it reached: ``attained = (persistence − SFNO) / (persistence −
bound)``, persistence from the skill bench's (all test times), the bound the unstirred solver. The report
records the planet's settings and periods, so ``benches/skill_swe.py --bound`` can refuse another planet's.

Usage: python benches/skill_bound.py [--out spherecast-out/skill_swe] [--days 487] [--starts 16]
       [--members 8] [--skill-report report.json] [--json FILE] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

# As in skill_swe.py: put the project root first so "ingest" is the package, not benches/ingest.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benches import skill_data as sd  # noqa: E402
from benches import skill_report as sr  # noqa: E402
from benches import skill_swe as sw  # noqa: E402
from ingest.planet import PlanetState  # noqa: E402
from ingest.sources import SYNTHETIC_LEVEL, SYNTHETIC_VARIABLES, SyntheticSource  # noqa: E402
from models.data import WindowDataset  # noqa: E402
from models.evaluate import area_mse  # noqa: E402
from models.losses import latitude_weights  # noqa: E402

log = logging.getLogger("benches.skill_bound")

FORECASTS = ("unstirred", "truncated", "ensemble_mean", "persistence", "climatology")
# The store holds float32 samples of the float64 solver: a reproduced state must match it to about that.
REPRODUCE_TOLERANCE = 1e-5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; the store settings are the skill bench's (``--days``, ``--quick``, ``--set``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("spherecast-out/skill_swe"),
                   help="the skill bench's --out (its default too)")
    p.add_argument("--days", type=float, help="the skill bench's --days (default 487; quick 12)")
    p.add_argument("--starts", type=int, default=16, help="initial times, evenly over the test period")
    p.add_argument("--members", type=int, default=8, help="stirred runs in the ensemble mean")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the skill bench's --set for the planet (ingest.synthetic.*), repeatable")
    p.add_argument("--skill-report", type=Path, help="skill_swe.py's --json, to print the SFNO beside the bound")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--quick", action="store_true", help="the skill bench's smoke-test planet")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.starts < 1 or args.members < 1:
        p.error(f"--starts and --members must be ≥ 1, got {args.starts}, {args.members}")
    if args.skill_report is not None and not args.skill_report.is_file():
        p.error(f"--skill-report {args.skill_report} is not a file")
    return args


def _runs(source: SyntheticSource, state: Any, seeds: list[int | None], lead_steps: list[int],
          order: list[int]) -> np.ndarray:
    """Fields ``(run, lead, channel, lat, lon)`` of the planet run from ``state`` with each seed's stirring."""
    out = np.empty((len(seeds), len(lead_steps), len(order), *source.grid.shape))
    for i, seed in enumerate(seeds):
        st = state
        for n in range(1, max(lead_steps) + 1):
            st = source.planet.forecast_step(st, seed)
            if n in lead_steps:
                out[i, lead_steps.index(n)] = source.project(st.uspec)[order]
    return out


def bound(args: argparse.Namespace) -> dict[str, Any]:
    """Score the unstirred solver, the stirred ensemble mean, persistence and climatology; return the report."""
    sargs = sw.parse_args(["--out", str(args.out)] + (["--days", str(args.days)] if args.days else [])
                          + (["--quick"] if args.quick else []) + [a for s in args.overrides for a in ("--set", s)])
    config, _, periods, _ = sw.plan(sargs)
    sd.build_store(config, progress=not args.quick)  # reused when the skill bench built it
    store = sd.open_store(config)
    channels, step_h, t = config.task.channels(), config.task.time_step_hours, config.train
    lead_steps = [h // step_h for h in sw.LEADS_H]
    test = WindowDataset(store, channels, periods.test_start, periods.end, max(lead_steps), step_h)
    clim = WindowDataset(store, channels, t.train_start, t.train_end, 1, step_h).time_mean().numpy()
    source = SyntheticSource(config.grid.grid(), config.ingest.synthetic)
    order = [[f"{v}_{SYNTHETIC_LEVEL}" for v in SYNTHETIC_VARIABLES].index(c) for c in channels]
    picks = sorted({round(k) for k in np.linspace(0, len(test) - 1, min(args.starts, len(test)))})
    seeds: list[int | None] = [None] + [source.planet.seed + 1 + m for m in range(args.members)]
    wt = latitude_weights(store["latitude"].size).double()
    w = wt.numpy()
    sums = np.zeros((len(FORECASTS), len(lead_steps), len(channels)))
    spread = np.zeros((len(lead_steps), len(channels)))
    began, worst_mismatch = time.perf_counter(), 0.0
    for done, k in enumerate(picks):
        t0 = pd.Timestamp(test.init_times[k])
        x0, y = (a.numpy().astype(np.float64) for a in test[k])
        state = source.planet.state_at(source.sample_index(t0))
        mismatch = float(np.abs(source.project(state.uspec)[order] - x0).max() / np.abs(x0).max())
        worst_mismatch = max(worst_mismatch, mismatch)
        if mismatch > REPRODUCE_TOLERANCE:
            raise RuntimeError(f"the planet re-run does not reproduce the store at {t0} (max difference "
                               f"{mismatch:.2e} of the field's maximum): the store was built with other settings")
        runs = _runs(source, state, seeds, lead_steps, order)
        seen = PlanetState(state.sample, source.band_limited(state.uspec), [])
        truncated = _runs(source, seen, [None], lead_steps, order)[0]
        members = runs[1:]
        for j, n in enumerate(lead_steps):
            truth = y[n - 1]
            preds = (runs[0, j], truncated[j], members[:, j].mean(axis=0), x0, clim)
            for f, pred in enumerate(preds):  # the validation's own area-weighted MSE, on a batch of one
                sums[f, j] += area_mse(torch.from_numpy(pred[None]), torch.from_numpy(truth[None]), wt).numpy()
            if len(members) > 1:
                spread[j] += (members[:, j].var(axis=0, ddof=1).mean(axis=-1) * w).sum(axis=-1)
        log.info("initial time %s done (%d/%d, %.0f s)", t0, done + 1, len(picks), time.perf_counter() - began)
    mse = sums / len(picks)
    clim_rmse = np.sqrt(mse[FORECASTS.index("climatology")])
    # The M-member mean carries sampling error of (ensemble variance)/M on top of the infinite ensemble's.
    infinite = np.sqrt(np.maximum(mse[FORECASTS.index("ensemble_mean")] - spread / len(picks) / args.members, 0.0))
    table: dict[str, dict[str, float]] = {}
    for j, h in enumerate(sw.LEADS_H):
        row = {name: float((np.sqrt(mse[f, j]) / clim_rmse[j]).mean()) for f, name in enumerate(FORECASTS)}
        row["ensemble_mean_infinite"] = float((infinite[j] / clim_rmse[j]).mean()) if args.members > 1 else None
        table[f"{h}h"] = row
    return {"command": " ".join(["python benches/skill_bound.py", *args.argv]),
            "periods": periods.as_dict(), "planet": config.ingest.synthetic.model_dump(mode="json"),
            "initial_times": [str(pd.Timestamp(test.init_times[k])) for k in picks], "members": args.members,
            "member_seeds": seeds[1:], "test_initial_times_available": len(test),
            "max_reproduction_difference": worst_mismatch, "seconds": round(time.perf_counter() - began, 1),
            "relative_error": table}


def print_report(r: dict[str, Any], skill: dict[str, Any] | None) -> None:
    """The bound per lead, each as a ratio to persistence, and the SFNO beside it when given."""
    print(f"\nPerfect-model bound from {len(r['initial_times'])} initial times ({r['initial_times'][0]} … "
          f"{r['initial_times'][-1]}), ensemble of {r['members']}; relative error (climatology = 1):")
    head = (f"{'lead':>5} {'unstirred':>10} {'truncated':>10} {'ens. mean':>10} {'ens. ∞':>8} {'persist.':>9} | "
            f"{'unstirred/p':>11} {'trunc./p':>8} {'∞/p':>6}")
    print(head + ("  | SFNO/p, attained vs unstirred, vs truncated (skill bench, all test times)" if skill else ""))
    for lead, row in r["relative_error"].items():
        inf = row["ensemble_mean_infinite"]
        best = inf if inf is not None else row["ensemble_mean"]
        trunc = row.get("truncated")  # reports before 2026-12-05 have no truncated run
        line = (f"{lead:>5} {row['unstirred']:>10.3f} {sr.fmt(trunc):>10} {row['ensemble_mean']:>10.3f} "
                f"{sr.fmt(inf):>8} {row['persistence']:>9.3f} | "
                f"{row['unstirred'] / row['persistence']:>11.2f} "
                f"{sr.fmt(None if trunc is None else trunc / row['persistence'], '.2f'):>8} "
                f"{best / row['persistence']:>6.2f}")
        if skill:
            s = skill["relative_error"][lead]
            a = attained_vs(r, skill)[lead]
            line += (f"  | {s['sfno'] / s['persistence']:.2f}, {sr.fmt(a['attained'], '.2f')}, "
                     f"{sr.fmt(a['attained_truncated'], '.2f')}")
        print(line)
    print(f"(states reproduced to {r['max_reproduction_difference']:.1e} of the field maximum; {r['seconds']} s)")


def attained_vs(r: dict[str, Any], skill: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per lead: the skill bench's SFNO and persistence, and its attained fraction of the way to each bound."""
    out = {}
    for lead, row in r["relative_error"].items():
        s = skill["relative_error"][lead]
        out[lead] = {"sfno": s["sfno"], "persistence": s["persistence"],
                     "attained": sr.attained(s["persistence"], s["sfno"], row["unstirred"]),
                     "attained_truncated": sr.attained(s["persistence"], s["sfno"], row.get("truncated"))}
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: measure, print, write ``--json``; exit 2 on a bad input."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # the solver's transforms are small; a second thread only spins
    try:
        skill = json.loads(args.skill_report.read_text()) if args.skill_report else None
        report = bound(args)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"skill_bound: error: {exc}", file=sys.stderr)
        return 2
    if skill:
        report["skill_report"] = {"path": str(args.skill_report), "leads": attained_vs(report, skill)}
    print_report(report, skill)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nreport written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
