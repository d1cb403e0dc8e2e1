"""Drive the real DBS policies with simulated devices at 64 to 4096 workers.

Why this exists: a multi-rank run on one machine tells us the policies work at
4 ranks; it says nothing about 4096, where the slowest of many noisy ranks sets
every step, a few disturbed ranks are a needle in a haystack, and the planner's
own cost (rank 0 computes the plan while everyone waits) grows with the world
size. The policies are the objects dbs-train uses, imported from
``dbs_hvd.plan`` / ``dbs_hvd.policies``; only the devices are simulated.

Device model: a step of ``b`` samples on rank i takes ``(a_i + c_i * b) * f_i(t)
* noise`` seconds, where ``c_i`` is drawn lognormal across ranks (speed
spread), ``a_i`` is a fixed fraction of ``c_i * B / N`` (per-step overhead),
``f_i(t)`` is the scenario's slowdown and ``noise`` is lognormal per rank and
step. A synchronous step lasts as long as its slowest rank.

Scenarios: ``steady`` (the spread alone), ``disturbance`` (the DBS paper's
protocol: each epoch every undisturbed rank is slowed with probability p, by a
random factor, for a random number of epochs), ``step`` (a fraction of the
ranks becomes k times slower mid-epoch and stays so) and ``noisy`` (a fraction
of the ranks varies far more from step to step than the rest, as a rank with
a noisy neighbour or a CPU quota does).

Run ``python -m benchmarks.scale_sim [--quick] [--workers 64,256,1024,4096]
[--seed 0] [--out DIR]``; it writes ``scale_sim.json`` and ``scale_sim.md``
under ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from dbs_hvd.train.metrics import balance_efficiency
from dbs_hvd.plan import Bounds, Plan, Policy, WindowStats, equalise_step_times
from dbs_hvd.policies import make_policy

SCENARIOS = ("steady", "disturbance", "step", "noisy")
WARMUP_EPOCHS = 2  # epochs left out of the steady-state efficiency
RECOVERY_TOLERANCE = 0.03  # a window within this of the pre-change efficiency has recovered


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DeviceModel:
    """How per-rank step times are drawn (see the module docstring)."""

    spread: float = 0.3  # sigma of log(per-sample cost) across ranks
    noise: float = 0.05  # sigma of the per-rank, per-step multiplicative noise
    overhead: float = 0.2  # a_i as a fraction of c_i * B / N


@dataclass(frozen=True)
class Scenario:
    """What happens to the devices over the run, beyond their fixed spread."""

    name: str = "steady"
    # disturbance (DBS paper protocol)
    slow_probability: float = 0.05
    slow_factor: tuple[float, float] = (2.0, 4.0)
    slow_epochs: tuple[int, int] = (1, 3)
    # step change
    change_epoch: int = 4
    change_at: float = 0.55  # fraction of the epoch; off the window boundaries on purpose
    change_factor: float = 3.0
    change_fraction: float = 0.01  # at least one rank
    # noisy ranks
    noisy_fraction: float = 0.1  # at least one rank
    noisy_sigma: float = 0.3  # their per-step noise, in place of the device model's

    def __post_init__(self) -> None:
        if self.name not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.name!r}; choose one of {SCENARIOS}")


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster and run length."""

    workers: int
    batch_per_worker: int = 32
    epochs: int = 10
    steps_per_epoch: int = 100
    seed: int = 0
    device: DeviceModel = DeviceModel()
    bounds: Bounds = Bounds()

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_per_worker


@dataclass(frozen=True)
class PolicySpec:
    """A policy by registry name, and how many steps it waits between rebalances."""

    label: str
    policy: str
    rebalance_every: int


def default_specs(steps_per_epoch: int, rebalance_every: int) -> list[PolicySpec]:
    """The comparison the report makes: static, paper and dbs, per epoch and every K steps.

    ``oracle`` is a reference, not a contender: it is told each rank's true cost
    curve for the coming window, so its efficiency is the ceiling the noise
    model allows (with many noisy ranks, the slowest one still sets each step).
    ``dbs means only`` is dbs without ``spread_aware``: it equalises the mean
    steps and ignores how much each rank varies from step to step.
    """
    s, k = steps_per_epoch, rebalance_every
    return [
        PolicySpec("static", "static", s),
        PolicySpec("paper K=S", "paper", s),
        PolicySpec(f"paper K={k}", "paper", k),
        PolicySpec(f"dbs K={k}", "dbs", k),
        PolicySpec(f"dbs means only K={k}", "dbs-means", k),
        PolicySpec("dbs K=S", "dbs", s),
        PolicySpec("oracle", "oracle", k),
    ]


# --------------------------------------------------------------------------- the cluster


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """An independent, reproducible stream per (seed, keys); strings are hashed stably."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed, *ints])


def disturbance_schedule(workers: int, epochs: int, scenario: Scenario,
                         rng: np.random.Generator) -> np.ndarray:
    """Per-epoch slowdown factors, shape (epochs, workers), for the paper's protocol.

    A rank that is not disturbed at the start of an epoch becomes disturbed with
    probability ``slow_probability`` for a whole number of epochs (uniform in
    ``slow_epochs``) by a factor uniform in ``slow_factor``; while disturbed it
    cannot be picked again, and once free it may be picked at once.
    """
    factors = np.ones((epochs, workers))
    current = np.ones(workers)
    remaining = np.zeros(workers, dtype=np.int64)
    low, high = scenario.slow_factor
    shortest, longest = scenario.slow_epochs
    for epoch in range(epochs):
        free = remaining == 0
        current[free] = 1.0
        start = free & (rng.random(workers) < scenario.slow_probability)
        current[start] = rng.uniform(low, high, size=int(start.sum()))
        remaining[start] = rng.integers(shortest, longest + 1, size=int(start.sum()))
        factors[epoch] = current
        remaining = np.maximum(remaining - 1, 0)
    return factors


class Cluster:
    """Simulated ranks: their cost curves, the scenario's slowdowns and the noise.

    Everything is drawn from the seed alone, never from what a policy does, so
    every policy meets the same devices, disturbances and noise (common random
    numbers): differences between policies are not sampling luck.
    """

    def __init__(self, config: SimConfig, scenario: Scenario) -> None:
        self.config, self.scenario = config, scenario
        n, steps = config.workers, config.steps_per_epoch
        devices = _rng(config.seed, n, "devices")
        self.per_sample = np.exp(devices.normal(0.0, config.device.spread, n)) * 1e-3
        self.overhead = config.device.overhead * self.per_sample * config.global_batch / n
        self.epoch_factors = np.ones((config.epochs, n))
        self.change_step: int | None = None
        self.changed_ranks = np.zeros(0, dtype=np.int64)
        self.noise_sigma = np.full(n, config.device.noise)
        events = _rng(config.seed, n, scenario.name, "events")
        if scenario.name == "disturbance":
            self.epoch_factors = disturbance_schedule(n, config.epochs, scenario, events)
        elif scenario.name == "step":
            count = max(1, round(scenario.change_fraction * n))
            self.changed_ranks = np.sort(events.choice(n, size=count, replace=False))
            self.change_step = (scenario.change_epoch * steps
                                + int(scenario.change_at * steps))
        elif scenario.name == "noisy":
            count = max(1, round(scenario.noisy_fraction * n))
            self.noise_sigma[events.choice(n, size=count, replace=False)] = scenario.noisy_sigma

    def factors(self, epoch: int) -> np.ndarray:
        """Slowdown of every rank at every step of ``epoch``, shape (steps, workers)."""
        steps = self.config.steps_per_epoch
        out = np.tile(self.epoch_factors[epoch], (steps, 1))
        if self.change_step is not None:
            first = self.change_step - epoch * steps
            if first < steps:
                rows = slice(max(first, 0), steps)
                out[rows, self.changed_ranks] *= self.scenario.change_factor
        return out

    def noise(self, epoch: int) -> np.ndarray:
        """Multiplicative step-time noise for ``epoch``, shape (steps, workers)."""
        rng = _rng(self.config.seed, self.config.workers, self.scenario.name, "noise", epoch)
        shape = (self.config.steps_per_epoch, self.config.workers)
        return np.exp(rng.normal(0.0, 1.0, shape) * self.noise_sigma)

    def true_costs(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Each rank's noiseless (a_i, c_i) at one step, slowdowns included (for the oracle)."""
        factor = self.factors(epoch)[step]
        return self.overhead * factor, self.per_sample * factor


class OracleReference(Policy):
    """Equalises the *true* noiseless step times of the coming window: an upper bound.

    It is not a policy one could deploy (it sees the future slowdowns); it
    marks how much of the remaining inefficiency is noise, not the planner.
    """

    name = "oracle"

    def __init__(self, global_batch: int, bounds: Bounds = Bounds()) -> None:
        super().__init__(global_batch, bounds)
        self.truth: tuple[np.ndarray, np.ndarray] | None = None

    def propose(self, stats: WindowStats, current: Plan) -> Plan:
        assert self.truth is not None, "the simulator sets the truth before each plan"
        overhead, per_sample = self.truth
        return Plan(tuple(equalise_step_times(overhead, per_sample, self.global_batch,
                                              self.bounds)))


def build_policy(name: str, config: SimConfig) -> Policy:
    """A registered dbs_hvd policy, ``dbs-means`` (dbs without spread_aware), or the oracle."""
    if name == "oracle":
        return OracleReference(config.global_batch, config.bounds)
    if name == "dbs-means":
        return make_policy("dbs", config.global_batch, config.bounds, spread_aware=False)
    return make_policy(name, config.global_batch, config.bounds)


# --------------------------------------------------------------------------- simulation


@dataclass
class Window:
    """One stretch of steps run under a single plan, ended by a rebalance."""

    start: int  # global step index of the first step
    stop: int  # one past the last
    seconds: float
    efficiency: float


@dataclass
class RunResult:
    """Everything one policy did in one scenario; plans only when asked for."""

    spec: PolicySpec
    steps_per_epoch: int
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_efficiency: list[float] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    plan_seconds: list[float] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.epoch_seconds))

    def steady_efficiency(self) -> float:
        """Median epoch efficiency once the policy has had ``WARMUP_EPOCHS`` to settle."""
        tail = self.epoch_efficiency[WARMUP_EPOCHS:] or self.epoch_efficiency
        return float(np.median(tail))


def window_stats(batch: np.ndarray, step_times: np.ndarray) -> WindowStats:
    """What the ranks would report for a window: samples, compute seconds, steps.

    Compute seconds are each rank's own step times; the time it then waits for
    the slowest rank is excluded, as timing.py excludes allreduce wait. Their
    squares give the spread from step to step, as timing.py's do.
    """
    steps = step_times.shape[0]
    return WindowStats(samples=batch * steps, compute_seconds=step_times.sum(axis=0),
                       steps=np.full(len(batch), float(steps)),
                       compute_squares=(step_times**2).sum(axis=0))


def simulate(config: SimConfig, scenario: Scenario, spec: PolicySpec,
             cluster: Cluster | None = None, keep_plans: bool = False) -> RunResult:
    """Run ``spec``'s policy through ``config.epochs`` epochs of ``scenario``.

    The policy is asked for a plan after every window of ``rebalance_every``
    steps (windows do not cross epoch ends; the epoch's last one may be short)
    and the new plan applies from the next step. Only ``next_plan`` is timed.
    """
    cluster = cluster or Cluster(config, scenario)
    policy = build_policy(spec.policy, config)
    plan = policy.initial_plan(config.workers)
    result = RunResult(spec, config.steps_per_epoch, plans=[plan] if keep_plans else [])
    steps, every = config.steps_per_epoch, spec.rebalance_every
    for epoch in range(config.epochs):
        slow, noise = cluster.factors(epoch), cluster.noise(epoch)
        samples = np.zeros(config.workers)
        compute = np.zeros(config.workers)
        wall = 0.0
        for start in range(0, steps, every):
            stop = min(start + every, steps)
            batch = np.asarray(plan.batch_sizes, dtype=float)
            noiseless = (cluster.overhead + cluster.per_sample * batch) * slow[start:stop]
            times = noiseless * noise[start:stop]
            stats = window_stats(batch, times)
            seconds = float(times.max(axis=1).sum())
            samples += stats.samples
            compute += stats.compute_seconds
            wall += seconds
            result.windows.append(Window(
                epoch * steps + start, epoch * steps + stop, seconds,
                balance_efficiency(stats.samples, stats.compute_seconds, [seconds])))
            if epoch == config.epochs - 1 and stop == steps:
                break  # no plan is needed after the last step
            if isinstance(policy, OracleReference):
                next_epoch, next_step = divmod(epoch * steps + stop, steps)
                policy.truth = cluster.true_costs(next_epoch, next_step)
            began = time.perf_counter()
            plan = policy.next_plan(stats, plan)
            result.plan_seconds.append(time.perf_counter() - began)
            if keep_plans:
                result.plans.append(plan)
        result.epoch_seconds.append(wall)
        result.epoch_efficiency.append(balance_efficiency(samples, compute, [wall]))
    return result


@dataclass(frozen=True)
class Recovery:
    """How long a policy took to get back to its own pre-change efficiency."""

    rebalances: int  # plans made between the change and the recovered window
    steps: int  # steps from the change to the recovered window's first step


def recovery(result: RunResult, change_step: int) -> Recovery | None:
    """When, after a step change, a window is back near the pre-change efficiency.

    The reference is the policy's own median window efficiency before the
    change (after warm-up), so a policy that was already badly balanced
    "recovers" at once: read it next to the efficiency column. A window has
    recovered when it starts after the change and comes within
    ``RECOVERY_TOLERANCE`` of the reference. Both counts are given because a
    rebalance per epoch and one per K steps are not the same unit of time.
    None: not recovered within the run.
    """
    warm = [w for w in result.windows if w.stop <= change_step]
    settled = [w for w in warm if w.start >= WARMUP_EPOCHS * result.steps_per_epoch] or warm
    if not settled:
        return None
    reference = float(np.median([w.efficiency for w in settled]))
    for window in result.windows:
        if window.start >= change_step and window.efficiency >= reference - RECOVERY_TOLERANCE:
            plans = sum(1 for w in result.windows if change_step < w.stop <= window.start)
            return Recovery(plans, window.start - change_step)
    return None


def time_one_plan(policy_name: str, workers: int, batch_per_worker: int = 32,
                  seed: int = 0, warm_windows: int = 3) -> float:
    """Seconds for one ``next_plan`` at ``workers`` ranks, after a few windows of history.

    The history matters for dbs: its cost-model fit runs over every rank's
    stored windows, so the first call is cheaper than the steady-state ones.
    """
    config = SimConfig(workers=workers, batch_per_worker=batch_per_worker, seed=seed)
    cluster = Cluster(config, Scenario("steady"))
    policy = build_policy(policy_name, config)
    plan = policy.initial_plan(workers)
    noise = cluster.noise(0)
    every = config.steps_per_epoch // (warm_windows + 1)
    for window in range(warm_windows + 1):
        batch = np.asarray(plan.batch_sizes, dtype=float)
        rows = slice(window * every, (window + 1) * every)
        times = (cluster.overhead + cluster.per_sample * batch) * noise[rows]
        if isinstance(policy, OracleReference):
            policy.truth = cluster.true_costs(0, 0)
        began = time.perf_counter()
        plan = policy.next_plan(window_stats(batch, times), plan)
        elapsed = time.perf_counter() - began
    return elapsed


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Row:
    """One line of the report: one policy, one scenario, one world size."""

    scenario: str
    workers: int
    policy: str
    rebalance_every: int
    efficiency: float
    time_vs_static: float
    plan_ms_median: float
    plan_ms_max: float
    rebalances: int
    recovery_rebalances: int | None
    recovery_steps: int | None
    epoch_efficiency: list[float]


def summarise(result: RunResult, static_seconds: float, scenario: Scenario,
              cluster: Cluster, workers: int) -> Row:
    """Reduce a run to the report's numbers."""
    ms = [1e3 * s for s in result.plan_seconds] or [math.nan]
    back = None
    if scenario.name == "step" and cluster.change_step is not None:
        back = recovery(result, cluster.change_step)
    return Row(
        scenario=scenario.name, workers=workers, policy=result.spec.label,
        rebalance_every=result.spec.rebalance_every,
        efficiency=round(result.steady_efficiency(), 4),
        time_vs_static=round(result.total_seconds / static_seconds, 4),
        plan_ms_median=round(float(np.median(ms)), 3), plan_ms_max=round(float(np.max(ms)), 3),
        rebalances=len(result.plan_seconds),
        recovery_rebalances=None if back is None else back.rebalances,
        recovery_steps=None if back is None else back.steps,
        epoch_efficiency=[round(e, 4) for e in result.epoch_efficiency],
    )


def run_benchmark(base: SimConfig, workers: Sequence[int], scenarios: Sequence[Scenario],
                  rebalance_every: int, log: TextIO | None = sys.stderr) -> list[Row]:
    """Every (world size, scenario, policy) combination; static first, as the yardstick."""
    rows: list[Row] = []
    for n in workers:
        config = replace(base, workers=n)
        for scenario in scenarios:
            cluster = Cluster(config, scenario)
            specs = default_specs(config.steps_per_epoch, rebalance_every)
            results = [simulate(config, scenario, spec, cluster) for spec in specs]
            static_seconds = results[0].total_seconds
            rows += [summarise(r, static_seconds, scenario, cluster, n) for r in results]
            if log is not None:
                print(f"  {n} workers, {scenario.name}: done", file=log, flush=True)
    return rows


def markdown_table(rows: Sequence[Row]) -> str:
    """The report as one Markdown table."""
    header = ("| scenario | workers | policy | K | efficiency | time vs static "
              "| plan ms median | plan ms max | rebalances | recovery: rebalances / steps |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        recovery = "" if r.scenario != "step" else (
            "never" if r.recovery_rebalances is None
            else f"{r.recovery_rebalances} / {r.recovery_steps}")
        lines.append(
            f"| {r.scenario} | {r.workers} | {r.policy} | {r.rebalance_every} | "
            f"{r.efficiency:.3f} | {r.time_vs_static:.3f} | {r.plan_ms_median:.2f} | "
            f"{r.plan_ms_max:.2f} | {r.rebalances} | {recovery} |")
    return "\n".join(lines)


def write_report(rows: Sequence[Row], meta: dict, out: Path) -> str:
    """Write scale_sim.json and scale_sim.md under ``out``; return the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / "scale_sim.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    notes = (
        "efficiency: median epoch balance efficiency (ideal/actual, dbs_hvd.train.metrics) after "
        f"{WARMUP_EPOCHS} warm-up epochs. time vs static: total simulated time / static's. "
        "plan ms: wall time of one policy.next_plan (noisy: shared machine). recovery: "
        "rebalances (and steps) after the step change before a window is within "
        f"{RECOVERY_TOLERANCE} of the policy's own pre-change efficiency. "
        "oracle: told the true costs (a ceiling, not a policy).")
    (out / "scale_sim.md").write_text(
        f"# scale_sim\n\n```\n{json.dumps(meta)}\n```\n\n{table}\n\n{notes}\n")
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_sim",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short runs (5 epochs of 20 steps) to finish in under a minute")
    parser.add_argument("--rebalance-every", type=int, default=2, metavar="K",
                        help="steps between rebalances for the per-K policies "
                             "(default: %(default)s, dbs-train's default for dbs)")
    parser.add_argument("--workers", default="64,256,1024,4096",
                        help="comma-separated world sizes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=DeviceModel.noise,
                        help="sigma of the per-step multiplicative step-time noise: it alone "
                             "caps efficiency at many workers, since each step waits for the "
                             "slowest draw (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/scale_sim"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    device = DeviceModel(noise=args.noise)
    if args.quick:
        base = SimConfig(workers=0, epochs=5, steps_per_epoch=20, seed=args.seed, device=device)
        scenarios = [Scenario("steady"), Scenario("disturbance"), Scenario("step", change_epoch=3),
                     Scenario("noisy")]
    else:
        base = SimConfig(workers=0, seed=args.seed, device=device)
        scenarios = [Scenario(name) for name in SCENARIOS]
    if args.rebalance_every < 1:
        raise SystemExit("--rebalance-every must be a positive number of steps")
    every = args.rebalance_every
    began = time.perf_counter()
    rows = run_benchmark(base, workers, scenarios, every)
    meta = {"workers": workers, "quick": args.quick, "seed": args.seed,
            "epochs": base.epochs, "steps_per_epoch": base.steps_per_epoch,
            "rebalance_every": every, "batch_per_worker": base.batch_per_worker,
            "device": asdict(base.device), "bounds": asdict(base.bounds),
            "scenarios": [asdict(s) for s in scenarios],
            "seconds": round(time.perf_counter() - began, 1)}
    print(write_report(rows, meta, args.out))
    print(f"\nwrote {args.out / 'scale_sim.json'} and {args.out / 'scale_sim.md'} "
          f"in {meta['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
