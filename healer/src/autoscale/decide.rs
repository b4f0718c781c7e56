//! The autoscaler's decision for one service: from the broker's concurrency samples and the number of
//! instances ready now, how many instances the service should have. It is Knative's KPA in outline (a
//! stable and a panic window over measured concurrency, rate limits relative to the ready count, a
//! scale-down delay) with its known failures designed out:
//!
//! - a restart loses history, and KPA's averages over a few seconds of data scaled busy services down; here
//!   nothing drops below the count running at start until a whole stable window of samples has been seen;
//! - leaving panic undid what panic had planned (knative/serving#3153): the panic's counts go through the
//!   scale-down delay like any other, and a rate limit is never a reason to shed instances already decided;
//! - a held request waited for the averages to move; here it gets an instance at once.
//!
//! No clock, no I/O: time is a [`Duration`] since an arbitrary monotonic epoch, passed in by the caller, so
//! every rule is tested with hand-made samples.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// Relative slack when turning a real-valued demand into a whole count: noise in the last bits of an
/// average (14.000000000000002 for 14) must not buy or cost an instance.
const COUNT_SLACK: f64 = 1e-9;

/// Request-seconds below which what is left of a trimmed sample is rounding, not demand.
const NEGLIGIBLE_REQUEST_SECONDS: f64 = 1e-9;

pub use vigil_core::scale::ScalePolicy;

/// What the broker measured for a service over `[end - span, end]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub end: Duration,
    pub span: Duration,
    /// Time-average over the span of the requests in flight at the service's instances plus those held
    /// waiting for an instance: an integral divided by `span`, not a point reading.
    pub concurrency: f64,
    /// Requests that arrived during the span.
    pub arrivals: u64,
    /// Requests held waiting for an instance at `end`.
    pub held: u32,
}

impl Sample {
    fn start(&self) -> Duration {
        self.end.saturating_sub(self.span)
    }

    /// Whether anything was asked of the service during the span: what the zero grace waits out.
    fn shows_activity(&self) -> bool {
        self.arrivals > 0 || self.concurrency > 0.0 || self.held > 0
    }
}

/// Whether the count may only rise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The stable window's average sets the count.
    Stable,
    /// A burst: the count follows the faster of the two windows and does not drop until the burst has
    /// been gone a whole stable window.
    Panic,
}

/// A rule that changed the count from what the averages alone asked for, in the order applied.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shaping {
    /// No sample overlaps the stable window: with nothing measured, the previous count is kept rather than
    /// read as no demand.
    NoData { kept: u32 },
    /// A rate limit bounded the change relative to the ready instances.
    RateLimited { wanted: u32, allowed: u32 },
    /// Panic held the count at the highest it reached in this panic.
    Panic { peak: u32 },
    /// A lower count has not yet been the decision for the whole scale-down delay.
    ScaleDownDelayed { from: u32, to: u32 },
    /// The last instance is kept: the service was active `idle_for` ago, within the zero grace.
    ZeroGrace {
        #[serde(serialize_with = "as_seconds")]
        idle_for: Duration,
    },
    /// Nothing is ready and requests are waiting: at least one instance now, whatever the averages say.
    FromZero { held: u32 },
    /// Less than a stable window of samples since start: not below the count running at start.
    WarmingUp { floor: u32 },
    /// Raised to the policy's minimum.
    Min { min: u32 },
    /// Lowered to the policy's maximum.
    Max { max: u32 },
}

/// The inputs of a decision and what shaped it: the `last_decision.why` of the API.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Why {
    /// Mean concurrency over the stable window.
    pub stable_concurrency: f64,
    /// Mean concurrency over the panic window.
    pub panic_concurrency: f64,
    /// The concurrency one instance is scaled for.
    pub per_instance_target: f64,
    /// Instances the stable average asks for, before any limit.
    pub stable_wants: u32,
    /// Instances the panic average asks for, before any limit.
    pub panic_wants: u32,
    /// Mean concurrency over the newest sample's interval.
    pub newest_concurrency: f64,
    /// Instances the newest interval asks for (followed in panic), before any limit.
    pub newest_wants: u32,
    /// Instances ready and serving when the decision was taken.
    pub ready: u32,
    /// Requests held waiting for an instance, per the newest sample.
    pub held: u32,
    pub shaped_by: Vec<Shaping>,
}

/// One decision: how many instances the service should have now, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub desired: u32,
    pub mode: Mode,
    pub why: Why,
}

/// A stretch of measured demand, stored without overlap so each moment counts once.
#[derive(Clone, Copy, Debug)]
struct Measured {
    start: Duration,
    end: Duration,
    concurrency: f64,
}

/// An ongoing panic.
#[derive(Clone, Copy, Debug)]
struct Panic {
    /// The last decision whose panic average was over the threshold.
    last_over: Duration,
    /// The highest count decided in this panic; it only rises.
    peak: u32,
}

/// The autoscaler of one service: keeps the windows of samples and the state the rules need between
/// decisions (panic, the scale-down delay, the last activity, warm-up).
#[derive(Clone, Debug)]
pub struct Decider {
    policy: ScalePolicy,
    started_at: Duration,
    count_at_start: u32,
    /// Ordered by time and non-overlapping; pruned to what the stable window can still see.
    measured: VecDeque<Measured>,
    /// Time covered by samples since `started_at`, until it reaches a stable window.
    measured_since_start: Duration,
    warmed_up: bool,
    /// The sample with the latest end: what "now" looks like (requests held, concurrency).
    newest: Option<Sample>,
    /// The latest moment any sample covered.
    measured_until: Duration,
    /// The end of the latest sample that showed any request.
    last_activity: Duration,
    panic: Option<Panic>,
    /// `(when, count)` of the counts decided within the scale-down delay, before the delay was applied.
    recently_wanted: VecDeque<(Duration, u32)>,
    last_desired: u32,
}

impl Decider {
    /// A decider for a service that runs `current` instances at `now` (after a restart of Vigil, the count
    /// it had before). Its activity history is unknown, so the service is taken to have been active at
    /// `now`: the zero grace starts then.
    pub fn new(policy: ScalePolicy, now: Duration, current: u32) -> Self {
        Self {
            policy,
            started_at: now,
            count_at_start: current,
            measured: VecDeque::new(),
            measured_since_start: Duration::ZERO,
            warmed_up: false,
            newest: None,
            measured_until: now,
            last_activity: now,
            panic: None,
            recently_wanted: VecDeque::new(),
            last_desired: current,
        }
    }

    /// The policy it decides by, for the API's view of a service.
    pub fn policy(&self) -> &ScalePolicy {
        &self.policy
    }

    /// Adds a sample. Samples may come at ticks or as pokes between them (a fresh short sample followed by
    /// [`decide`](Self::decide)), in either order:
    ///
    /// - each sample weighs in the windows by the time it covers, so a poke's short sample barely moves an
    ///   average;
    /// - where a sample overlaps time already measured (a tick sample covering a poke's span), the demand
    ///   already counted is subtracted from its integral and only the rest is stored for the new time,
    ///   which is exact when the earlier samples tile the overlap; a sample wholly inside measured time
    ///   adds nothing to the windows;
    /// - a non-finite or negative concurrency counts as 0: a broken gauge must not buy instances.
    pub fn record(&mut self, sample: Sample) {
        let concurrency =
            if sample.concurrency.is_finite() && sample.concurrency > 0.0 { sample.concurrency } else { 0.0 };
        let sample = Sample { concurrency, ..sample };
        if self.newest.is_none_or(|newest| sample.end >= newest.end) {
            self.newest = Some(sample);
        }
        if sample.shows_activity() {
            self.last_activity = self.last_activity.max(sample.end);
        }
        self.measured_until = self.measured_until.max(sample.end);

        let mut start = sample.start();
        let mut request_seconds = concurrency * sample.span.as_secs_f64();
        if let Some(last) = self.measured.back() {
            let measured_end = last.end;
            if sample.end <= measured_end {
                return;
            }
            if start < measured_end {
                request_seconds -= self.request_seconds_over(start, measured_end);
                start = measured_end;
            }
        }
        let span = sample.end - start;
        if span.is_zero() {
            return;
        }
        let concurrency = if request_seconds > NEGLIGIBLE_REQUEST_SECONDS {
            request_seconds / span.as_secs_f64()
        } else {
            0.0
        };
        self.measured.push_back(Measured { start, end: sample.end, concurrency });

        if !self.warmed_up {
            let new_since_start = sample.end.saturating_sub(start.max(self.started_at));
            self.measured_since_start = self.measured_since_start.saturating_add(new_since_start);
            self.warmed_up = self.measured_since_start >= self.policy.stable_window;
        }
        // Bounds memory when samples come without decisions; `decide` prunes exactly.
        self.forget_before(sample.end.saturating_sub(self.policy.stable_window.saturating_mul(2)));
    }

    /// The count the service should have at `now`, with `ready` instances ready and serving. The rules, in
    /// the order applied:
    ///
    /// 1. Demand: the stable and panic concurrencies are the time-weighted means of the samples over the
    ///    last `stable_window` / `panic_window` (a window not yet full averages over what it has), and
    ///    each asks for `ceil(mean / per_instance_target)` instances. No sample in the stable window keeps
    ///    the previous count: missing data is not idleness.
    /// 2. Panic begins when the panic mean reaches `panic_threshold` × the ready capacity (`max(1, ready)`
    ///    × target), is extended by every decision over it, and ends only after a whole stable window with
    ///    none: the burst must have passed through the stable average before that average rules again. In
    ///    panic the count is the larger of the two asks and never below the highest count of this panic
    ///    (it starts at the count before the panic), so panic only adds.
    /// 3. Scale-up rate: at most `ceil(max_scale_up_rate × max(1, ready))`, because instances that are
    ///    not ready yet cannot show whether more are needed; but never less than the previous decision,
    ///    because a limit on growth is no reason to shed instances already asked for (KPA's drop at the end
    ///    of panic while instances were still starting).
    /// 4. Scale-down delay: the count is the highest asked for within the last `scale_down_delay`, so a
    ///    lower count applies only once it has been asked for that long, and a rise applies at once.
    /// 5. Scale-down rate: at least `floor(max(1, ready) / max_scale_down_rate)`, unless the previous
    ///    decision was already lower (instances still stopping are not a reason to restart them).
    /// 6. Zero grace: from a count above 0, 0 only once no request arrived, was in flight or was held for
    ///    `zero_grace`; the next request would otherwise pay a cold start.
    /// 7. From zero: with nothing ready and a request held (or any concurrency in the newest sample), at
    ///    least `max(1, ceil(held / target))` (within the scale-up rate) at once: a held request must not
    ///    wait for averages.
    /// 8. Warm-up: until a stable window of samples has been recorded since [`new`](Self::new), not below
    ///    the count running at start: after a restart the missing history is not an absence of demand.
    /// 9. Finally within `[min, max]`.
    pub fn decide(&mut self, now: Duration, ready: u32) -> Decision {
        // A copy, so the rules below can update the decider while reading it (a dozen numbers).
        let policy = self.policy.clone();
        let target = policy.per_instance_target();
        self.forget_before(now.saturating_sub(policy.stable_window));
        let (stable_concurrency, stable_measured) = self.mean_concurrency(now, policy.stable_window);
        let (panic_concurrency, _) = self.mean_concurrency(now, policy.panic_window);
        let stable_wants = ceil_count(stable_concurrency / target);
        let panic_wants = ceil_count(panic_concurrency / target);
        // What the newest interval alone asks for. In panic the count follows it, not only the panic
        // window's average, which fills over the whole window after a step: panic already means "more, now",
        // only scales up and is held by the scale-down delay, so reacting to the newest interval costs at
        // most a short over-provision (cheap with a standby tier) and saves the window's ramp.
        let newest_concurrency = self.newest.map_or(0.0, |sample| sample.concurrency);
        let newest_wants = ceil_count(newest_concurrency / target);
        let readyish = f64::from(ready.max(1));
        let up_limit = ceil_count(policy.max_scale_up_rate * readyish).max(self.last_desired);
        let down_limit = floor_count(readyish / policy.max_scale_down_rate).min(self.last_desired);
        let mut shaped_by = Vec::new();

        let over_threshold = panic_concurrency >= policy.panic_threshold * readyish * target;
        self.panic = match self.panic {
            Some(panic) if over_threshold => Some(Panic { last_over: now, ..panic }),
            None if over_threshold => Some(Panic { last_over: now, peak: self.last_desired }),
            Some(panic) if now.saturating_sub(panic.last_over) >= policy.stable_window => None,
            unchanged => unchanged,
        };

        let mut wanted = if stable_measured.is_zero() {
            shaped_by.push(Shaping::NoData { kept: self.last_desired });
            self.last_desired
        } else {
            let asked = if self.panic.is_some() {
                stable_wants.max(panic_wants).max(newest_wants)
            } else {
                stable_wants
            };
            if asked > up_limit {
                shaped_by.push(Shaping::RateLimited { wanted: asked, allowed: up_limit });
            }
            asked.min(up_limit)
        };
        if let Some(panic) = self.panic
            && panic.peak > wanted
        {
            shaped_by.push(Shaping::Panic { peak: panic.peak });
            wanted = panic.peak;
        }

        let delay = policy.scale_down_delay;
        self.recently_wanted.push_back((now, wanted));
        while self.recently_wanted.len() > 1
            && self
                .recently_wanted
                .front()
                .is_some_and(|&(when, _)| when.checked_add(delay).is_some_and(|t| t <= now))
        {
            self.recently_wanted.pop_front();
        }
        let held_back = self.recently_wanted.iter().map(|&(_, count)| count).max().unwrap_or(wanted);
        let mut desired = wanted;
        if held_back > desired {
            shaped_by.push(Shaping::ScaleDownDelayed { from: held_back, to: desired });
            desired = held_back;
        }

        if desired < down_limit {
            shaped_by.push(Shaping::RateLimited { wanted: desired, allowed: down_limit });
            desired = down_limit;
        }

        if desired == 0 && self.last_desired > 0 {
            let idle_for = self.measured_until.min(now).saturating_sub(self.last_activity);
            if idle_for < policy.zero_grace {
                shaped_by.push(Shaping::ZeroGrace { idle_for });
                desired = 1;
            }
        }

        let held = self.newest.map_or(0, |sample| sample.held);
        let demand_now = self.newest.is_some_and(|sample| sample.concurrency > 0.0);
        if ready == 0 && (held > 0 || demand_now) {
            let needed = ceil_count(f64::from(held) / target).min(up_limit).max(1);
            if desired < needed {
                shaped_by.push(Shaping::FromZero { held });
                desired = needed;
            }
        }

        if !self.warmed_up && desired < self.count_at_start {
            shaped_by.push(Shaping::WarmingUp { floor: self.count_at_start });
            desired = self.count_at_start;
        }

        if desired < policy.min {
            shaped_by.push(Shaping::Min { min: policy.min });
            desired = policy.min;
        }
        if desired > policy.max {
            shaped_by.push(Shaping::Max { max: policy.max });
            desired = policy.max;
        }

        let mode = match &mut self.panic {
            Some(panic) => {
                // Every rule after the peak only raised the count, or lowered it to `max`, which the
                // peak (a previous decision) already respects: so panic never lowers the count.
                panic.peak = desired;
                Mode::Panic
            }
            None => Mode::Stable,
        };
        self.last_desired = desired;
        Decision {
            desired,
            mode,
            why: Why {
                stable_concurrency,
                panic_concurrency,
                per_instance_target: target,
                stable_wants,
                panic_wants,
                newest_concurrency,
                newest_wants,
                ready,
                held,
                shaped_by,
            },
        }
    }

    /// Drops what ended at or before `horizon`: no window can see it any more.
    fn forget_before(&mut self, horizon: Duration) {
        while self.measured.front().is_some_and(|m| m.end <= horizon) {
            self.measured.pop_front();
        }
    }

    /// Request-seconds measured within `[from, to]`.
    fn request_seconds_over(&self, from: Duration, to: Duration) -> f64 {
        self.measured.iter().map(|m| m.concurrency * overlap(m, from, to).as_secs_f64()).sum()
    }

    /// The mean concurrency over the `window` ending at `now`, weighting each sample by its overlap with
    /// the window, and how much of the window samples cover.
    fn mean_concurrency(&self, now: Duration, window: Duration) -> (f64, Duration) {
        let from = now.saturating_sub(window);
        let covered: Duration = self.measured.iter().map(|m| overlap(m, from, now)).sum();
        if covered.is_zero() {
            return (0.0, covered);
        }
        (self.request_seconds_over(from, now) / covered.as_secs_f64(), covered)
    }
}

fn overlap(measured: &Measured, from: Duration, to: Duration) -> Duration {
    measured.end.min(to).saturating_sub(measured.start.max(from))
}

/// Instances for a real-valued need, rounding up; saturates at `u32::MAX` and reads NaN as 0.
fn ceil_count(need: f64) -> u32 {
    (need * (1.0 - COUNT_SLACK)).ceil() as u32
}

/// Instances for a real-valued bound, rounding down; saturating like [`ceil_count`].
fn floor_count(bound: f64) -> u32 {
    (bound * (1.0 + COUNT_SLACK)).floor() as u32
}

fn as_seconds<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

impl fmt::Display for Shaping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoData { kept } => write!(f, "no samples in the stable window, kept {kept}"),
            Self::RateLimited { wanted, allowed } => {
                write!(f, "rate limit: wanted {wanted}, allowed {allowed}")
            }
            Self::Panic { peak } => write!(f, "panic holds {peak}"),
            Self::ScaleDownDelayed { from, to } => write!(f, "scale-down to {to} delayed, kept {from}"),
            Self::ZeroGrace { idle_for } => {
                write!(f, "zero grace: idle only {:.1}s, kept 1", idle_for.as_secs_f64())
            }
            Self::FromZero { held } => write!(f, "from zero: {held} held, none ready"),
            Self::WarmingUp { floor } => write!(f, "warming up: not below the {floor} running at start"),
            Self::Min { min } => write!(f, "min {min}"),
            Self::Max { max } => write!(f, "max {max}"),
        }
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stable {:.2} wants {}, panic {:.2} wants {}, newest {:.2} wants {} (target {:.2} per instance); ready {}, held {}",
            self.stable_concurrency,
            self.stable_wants,
            self.panic_concurrency,
            self.panic_wants,
            self.newest_concurrency,
            self.newest_wants,
            self.per_instance_target,
            self.ready,
            self.held
        )?;
        if self.shaped_by.is_empty() {
            return write!(f, "; no limit applied");
        }
        for (i, shaping) in self.shaped_by.iter().enumerate() {
            write!(f, "{}{shaping}", if i == 0 { "; " } else { ", " })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TICK: Duration = Duration::from_secs(1);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A service driven by one decider at 1 s ticks. Ready instances follow the decisions `lag` ticks
    /// late (instances take that long to start or stop), unless `fixed_ready` pins them.
    struct Sim {
        decider: Decider,
        now: Duration,
        fixed_ready: Option<u32>,
        ready_then: VecDeque<u32>,
    }

    impl Sim {
        /// Arbitrary epoch: no rule may depend on time starting at 0.
        const EPOCH: Duration = Duration::from_secs(1_000);

        fn new(policy: ScalePolicy, current: u32, lag: usize) -> Self {
            Self {
                decider: Decider::new(policy, Self::EPOCH, current),
                now: Self::EPOCH,
                fixed_ready: None,
                ready_then: std::iter::repeat_n(current, lag + 1).collect(),
            }
        }

        fn ready(&self) -> u32 {
            self.fixed_ready.unwrap_or_else(|| self.ready_then.front().copied().unwrap_or(0))
        }

        /// Seconds since the epoch.
        fn elapsed(&self) -> u64 {
            (self.now - Self::EPOCH).as_secs()
        }

        /// One tick at a constant concurrency over it.
        fn tick(&mut self, concurrency: f64) -> Decision {
            let arrivals = u64::from(concurrency > 0.0);
            self.tick_with(Sample { end: self.now + TICK, span: TICK, concurrency, arrivals, held: 0 })
        }

        fn tick_with(&mut self, sample: Sample) -> Decision {
            self.now = sample.end;
            self.decider.record(sample);
            let decision = self.decider.decide(self.now, self.ready());
            self.ready_then.push_back(decision.desired);
            self.ready_then.pop_front();
            decision
        }

        fn ticks(&mut self, n: usize, concurrency: f64) -> Vec<Decision> {
            (0..n).map(|_| self.tick(concurrency)).collect()
        }
    }

    fn counts(decisions: &[Decision]) -> Vec<u32> {
        decisions.iter().map(|d| d.desired).collect()
    }

    #[test]
    fn forty_concurrent_from_zero_asks_for_six_at_once_and_keeps_six() {
        let mut sim = Sim::new(ScalePolicy::default(), 0, 0);
        let decisions = sim.ticks(200, 40.0);
        assert_eq!(counts(&decisions), vec![6; 200], "ceil(40 / (10 × 0.7)) = 6");
        assert_eq!(decisions[199].mode, Mode::Stable);
        assert_eq!(decisions[199].why.stable_wants, 6);
    }

    /// Steady at 2 instances (14 concurrent), then 4× that for 10 s while new instances take 12 s to get
    /// ready, then back to 14.
    fn burst() -> (Vec<Decision>, usize, usize) {
        let mut sim = Sim::new(ScalePolicy::default(), 2, 12);
        let mut decisions = sim.ticks(70, 14.0);
        assert!(decisions.iter().all(|d| d.desired == 2 && d.mode == Mode::Stable), "{decisions:?}");
        let burst_start = decisions.len();
        decisions.extend(sim.ticks(10, 56.0));
        let burst_end = decisions.len();
        decisions.extend(sim.ticks(200, 14.0));
        (decisions, burst_start, burst_end)
    }

    #[test]
    fn a_burst_panics_within_a_panic_window_and_panic_outlives_it_by_a_stable_window_only_adding() {
        let (decisions, burst_start, burst_end) = burst();
        let first_panic = decisions.iter().position(|d| d.mode == Mode::Panic).expect("never panicked");
        assert!(first_panic >= burst_start && first_panic < burst_start + 6, "panic at tick {first_panic}");
        let panic_end = first_panic
            + decisions[first_panic..].iter().position(|d| d.mode == Mode::Stable).expect("no end");
        assert!(panic_end >= burst_end + 60, "panic ended at tick {panic_end}, burst ended at {burst_end}");
        assert!(decisions[first_panic..panic_end].iter().all(|d| d.mode == Mode::Panic));
        for pair in decisions[first_panic - 1..panic_end].windows(2) {
            assert!(pair[1].desired >= pair[0].desired, "panic lowered the count: {pair:?}");
        }
        assert_eq!(decisions[panic_end - 1].desired, 8, "the burst asks for 8, the max");
    }

    #[test]
    fn leaving_panic_steps_down_without_dropping_and_spiking_again() {
        let (decisions, burst_start, _) = burst();
        let after = counts(&decisions[burst_start..]);
        let peak_at = after.iter().position(|&c| c == 8).expect("never reached the peak");
        for pair in after[peak_at..].windows(2) {
            assert!(pair[1] <= pair[0], "count rose again after falling: {after:?}");
        }
        assert_eq!(*after.last().unwrap_or(&0), 2, "{after:?}");
        // The way down: 8 held through panic and the delay, then halved per the ready count.
        let mut steps = after[peak_at..].to_vec();
        steps.dedup();
        assert_eq!(steps, vec![8, 4, 2]);
    }

    #[test]
    fn a_readiness_dip_as_panic_ends_does_not_shed_instances() {
        let policy = ScalePolicy { max: 100, max_scale_up_rate: 1.5, ..ScalePolicy::default() };
        let mut sim = Sim::new(policy, 20, 0);
        sim.fixed_ready = Some(20);
        assert_eq!(counts(&sim.ticks(70, 140.0)), vec![20; 70]);
        // 350 concurrent need 50; ready 20 allows 30, then ready 34 allows 51.
        let decisions = sim.ticks(6, 350.0);
        assert_eq!(decisions[5].mode, Mode::Panic);
        assert_eq!(decisions[5].desired, 30);
        sim.fixed_ready = Some(34);
        assert_eq!(sim.tick(350.0).desired, 50);
        // Some instances restart; ceil(1.5 × 30) = 45 < 50, but 50 were asked for and are still needed.
        sim.fixed_ready = Some(30);
        let decisions = sim.ticks(120, 350.0);
        assert!(decisions.iter().any(|d| d.mode == Mode::Stable), "panic never ended");
        assert_eq!(counts(&decisions), vec![50; 120]);
    }

    #[test]
    fn a_scale_down_waits_the_scale_down_delay_at_the_lower_count() {
        let policy = ScalePolicy { stable_window: secs(2), panic_window: secs(1), ..ScalePolicy::default() };
        let mut sim = Sim::new(policy, 0, 0);
        assert_eq!(counts(&sim.ticks(10, 40.0)), vec![6; 10]);
        let six_last_asked_at = sim.elapsed();
        let decisions = sim.ticks(80, 14.0);
        // The first tick at 14 still has a second at 40 in the 2 s stable window: it asks for 4, then 2.
        assert_eq!(decisions[0].why.stable_wants, 4);
        assert_eq!(decisions[1].why.stable_wants, 2);
        let first_lower = decisions.iter().position(|d| d.desired < 6).expect("never scaled down");
        assert_eq!(six_last_asked_at + 1 + first_lower as u64, six_last_asked_at + 30, "the delay is 30 s");
        assert_eq!(
            decisions[first_lower - 1].why.shaped_by,
            vec![Shaping::ScaleDownDelayed { from: 6, to: 2 }]
        );
        // Each lower count waits its own delay: 4 was asked for a second after 6, so it holds one tick.
        assert_eq!(counts(&decisions[first_lower..first_lower + 4]), vec![4, 2, 2, 2]);
        assert!(decisions[first_lower + 1..].iter().all(|d| d.desired == 2));
    }

    #[test]
    fn rate_limits_bound_each_step_relative_to_the_ready_count() {
        let policy = ScalePolicy {
            max: 100,
            max_scale_up_rate: 2.0,
            stable_window: secs(2),
            panic_window: secs(1),
            scale_down_delay: Duration::ZERO,
            zero_grace: Duration::ZERO,
            ..ScalePolicy::default()
        };
        let mut sim = Sim::new(policy.clone(), 1, 0);
        sim.fixed_ready = Some(1);
        let decisions = sim.ticks(3, 700.0);
        assert_eq!(counts(&decisions), vec![2, 2, 2], "rate 2 from 1 ready");
        assert_eq!(decisions[0].why.shaped_by[0], Shaping::RateLimited { wanted: 100, allowed: 2 });
        sim.fixed_ready = None;
        assert_eq!(counts(&sim.ticks(7, 700.0)), vec![4, 8, 16, 32, 64, 100, 100]);

        let mut sim = Sim::new(policy, 8, 0);
        sim.fixed_ready = Some(8);
        // Two ticks of warm-up at 8, then halving from 8 ready at most.
        assert_eq!(counts(&sim.ticks(4, 0.0)), vec![8, 4, 4, 4]);
        sim.fixed_ready = None;
        assert_eq!(counts(&sim.ticks(4, 0.0)), vec![2, 1, 0, 0]);
    }

    #[test]
    fn min_and_max_bound_the_count() {
        let policy = ScalePolicy { max: 3, ..ScalePolicy::default() };
        let mut sim = Sim::new(policy, 0, 0);
        let decisions = sim.ticks(5, 100.0);
        assert_eq!(counts(&decisions), vec![3; 5]);
        assert!(decisions[4].why.shaped_by.contains(&Shaping::Max { max: 3 }));

        let policy = ScalePolicy {
            min: 2,
            stable_window: secs(2),
            panic_window: secs(1),
            scale_down_delay: Duration::ZERO,
            zero_grace: Duration::ZERO,
            ..ScalePolicy::default()
        };
        let mut sim = Sim::new(policy, 0, 0);
        let decisions = sim.ticks(5, 0.0);
        assert_eq!(counts(&decisions), vec![2; 5], "min above 0 never reaches 0");
        assert_eq!(decisions[0].why.shaped_by, vec![Shaping::Min { min: 2 }]);
        assert!(decisions[4].why.shaped_by.contains(&Shaping::Min { min: 2 }));
    }

    fn zero_grace_policy() -> ScalePolicy {
        ScalePolicy {
            stable_window: secs(10),
            panic_window: secs(2),
            scale_down_delay: Duration::ZERO,
            ..ScalePolicy::default()
        }
    }

    #[test]
    fn the_last_instance_stops_only_after_the_zero_grace_without_requests() {
        let mut sim = Sim::new(zero_grace_policy(), 0, 0);
        assert_eq!(counts(&sim.ticks(20, 1.0)), vec![1; 20]);
        let decisions = sim.ticks(40, 0.0);
        let first_zero = decisions.iter().position(|d| d.desired == 0).expect("never reached 0");
        assert_eq!(first_zero, 29, "last activity at the end of tick 20, 30 s idle at the end of tick 50");
        assert!(decisions[first_zero..].iter().all(|d| d.desired == 0));
        assert_eq!(decisions[28].why.shaped_by, vec![Shaping::ZeroGrace { idle_for: secs(29) }]);
    }

    #[test]
    fn a_single_request_within_the_zero_grace_restarts_it() {
        let mut sim = Sim::new(zero_grace_policy(), 0, 0);
        sim.ticks(20, 1.0);
        assert_eq!(counts(&sim.ticks(15, 0.0)), vec![1; 15]);
        let one_request = Sample { end: sim.now + TICK, span: TICK, concurrency: 0.05, arrivals: 1, held: 0 };
        assert_eq!(sim.tick_with(one_request).desired, 1);
        let decisions = sim.ticks(40, 0.0);
        let first_zero = decisions.iter().position(|d| d.desired == 0).expect("never reached 0");
        assert_eq!(first_zero, 29, "30 s after the request, not after the earlier traffic");
    }

    #[test]
    fn after_a_restart_the_count_at_start_holds_until_a_stable_window_of_samples() {
        let mut sim = Sim::new(ScalePolicy::default(), 5, 0);
        sim.fixed_ready = Some(5);
        let decisions = sim.ticks(59, 0.0);
        assert_eq!(counts(&decisions), vec![5; 59]);
        assert!(decisions[58].why.shaped_by.contains(&Shaping::WarmingUp { floor: 5 }));
        let after = sim.tick(0.0);
        assert_eq!(sim.elapsed(), 60);
        assert_eq!(after.desired, 2, "warmed up: down by the rate limit, floor(5 / 2)");
    }

    #[test]
    fn warm_up_still_allows_scaling_up() {
        let mut sim = Sim::new(ScalePolicy::default(), 2, 0);
        assert_eq!(sim.tick(40.0).desired, 6);
    }

    #[test]
    fn a_poke_with_one_held_request_asks_for_one_instance_at_once_without_distorting_the_windows() {
        let mut sim = Sim::new(ScalePolicy::default(), 0, 0);
        assert_eq!(counts(&sim.ticks(10, 0.0)), vec![0; 10]);
        let tick_start = sim.now;
        // A request arrives 0.25 s into the tick and is held: the broker pokes at once.
        let poke = Sample {
            end: tick_start + Duration::from_millis(250),
            span: Duration::from_millis(250),
            concurrency: 0.0,
            arrivals: 1,
            held: 1,
        };
        let decision = sim.tick_with(poke);
        assert_eq!(decision.desired, 1);
        assert!(decision.why.shaped_by.contains(&Shaping::FromZero { held: 1 }));
        // The regular tick covers the whole second again (the request held or served for 0.75 s of it).
        let whole_tick =
            Sample { end: tick_start + TICK, span: TICK, concurrency: 0.75, arrivals: 1, held: 0 };
        sim.decider.record(whole_tick);
        let decision = sim.decider.decide(tick_start + TICK, 1);
        assert_eq!(decision.desired, 1);
        // 0.75 request-seconds over the 11 s measured, counted once.
        assert!((decision.why.stable_concurrency - 0.75 / 11.0).abs() < 1e-12, "{decision:?}");
    }

    #[test]
    fn many_held_requests_from_zero_ask_for_enough_instances_within_the_rate() {
        let mut sim = Sim::new(ScalePolicy::default(), 0, 0);
        sim.ticks(5, 0.0);
        let poke = Sample {
            end: sim.now + Duration::from_millis(10),
            span: Duration::from_millis(10),
            concurrency: 0.0,
            arrivals: 30,
            held: 30,
        };
        let decision = sim.tick_with(poke);
        assert_eq!(decision.desired, 5, "ceil(30 / 7)");
    }

    #[test]
    fn no_samples_keeps_the_count_rather_than_reading_idleness() {
        let mut sim = Sim::new(ScalePolicy::default(), 0, 0);
        sim.ticks(100, 40.0);
        let decision = sim.decider.decide(sim.now + secs(120), 6);
        assert_eq!(decision.desired, 6);
        assert_eq!(decision.why.shaped_by, vec![Shaping::NoData { kept: 6 }]);
    }

    #[test]
    fn in_panic_a_step_is_followed_at_once_not_as_the_panic_window_fills() {
        // One instance, quiet for a stable window; then 40 in flight, in quarter-second samples.
        let policy =
            ScalePolicy { min: 1, stable_window: secs(10), panic_window: secs(2), ..ScalePolicy::default() };
        let mut sim = Sim::new(policy, 1, 0);
        sim.fixed_ready = Some(1);
        let quarter = Duration::from_millis(250);
        let mut desired = Vec::new();
        for _ in 0..40 {
            let d = sim.tick_with(Sample {
                end: sim.now + quarter,
                span: quarter,
                concurrency: 0.0,
                arrivals: 0,
                held: 0,
            });
            assert_eq!(d.desired, 1);
        }
        for _ in 0..4 {
            let sample =
                Sample { end: sim.now + quarter, span: quarter, concurrency: 40.0, arrivals: 40, held: 0 };
            let d = sim.tick_with(sample);
            desired.push((d.desired, d.mode));
        }
        // The panic window's average crosses 2 × capacity (14) after 0.75 s: from then the count is the
        // newest interval's ceil(40 / 7) = 6, not the average's 3, 4, 5 on the way.
        assert_eq!(desired, [(1, Mode::Stable), (1, Mode::Stable), (6, Mode::Panic), (6, Mode::Panic)],);
    }

    #[test]
    fn why_reads_as_one_line_and_serializes_in_snake_case() {
        let mut sim = Sim::new(ScalePolicy::default(), 0, 0);
        let decision = sim.tick(40.0);
        assert_eq!(
            decision.why.to_string(),
            "stable 40.00 wants 6, panic 40.00 wants 6, newest 40.00 wants 6 (target 7.00 per instance); \
             ready 0, held 0; no limit applied"
        );
        let delayed = Why {
            shaped_by: vec![Shaping::ScaleDownDelayed { from: 6, to: 2 }, Shaping::Min { min: 3 }],
            ..decision.why.clone()
        };
        assert!(delayed.to_string().ends_with("; scale-down to 2 delayed, kept 6, min 3"), "{delayed}");
        let json = serde_json::to_value(&decision).unwrap_or_default();
        assert_eq!(json["mode"], "panic");
        let zero_grace = serde_json::to_value(Shaping::ZeroGrace { idle_for: Duration::from_millis(1500) })
            .unwrap_or_default();
        assert_eq!(zero_grace, serde_json::json!({"kind": "zero_grace", "idle_for": 1.5}));
    }

    fn any_policy() -> impl Strategy<Value = ScalePolicy> {
        (
            (0u32..4, 1u32..8, 0.5f64..50.0, 0.1f64..=1.0, 1u64..90, 1u64..90),
            (1.0f64..4.0, 0u64..60, 0u64..60, 1.01f64..20.0, 1.01f64..5.0),
        )
            .prop_map(|((min, extra, concurrency, utilization, stable, panic), rest)| {
                let (threshold, delay, grace, up, down) = rest;
                let max = min + extra;
                ScalePolicy {
                    min,
                    max,
                    target_concurrency: concurrency,
                    target_utilization: utilization,
                    standby: max / 2,
                    stable_window: secs(stable.max(panic)),
                    panic_window: secs(panic.min(stable)),
                    panic_threshold: threshold,
                    scale_down_delay: secs(delay),
                    zero_grace: secs(grace),
                    max_scale_up_rate: up,
                    max_scale_down_rate: down,
                }
            })
    }

    /// One step: a whole tick or a poke of a fraction of one, then a decision.
    fn any_step() -> impl Strategy<Value = (bool, u64, f64, u64, u32, u32)> {
        (
            any::<bool>(),
            1u64..1000,
            prop_oneof![Just(0.0), 0.0f64..300.0],
            0u64..4,
            prop_oneof![Just(0u32), 0u32..6],
            0u32..14,
        )
    }

    proptest! {
        #[test]
        fn any_samples_keep_the_count_within_bounds_warm_and_rising_in_panic(
            policy in any_policy(),
            current in 0u32..14,
            steps in proptest::collection::vec(any_step(), 1..250),
        ) {
            prop_assume!(policy.problems(TICK).is_empty());
            let start = secs(500);
            let mut decider = Decider::new(policy.clone(), start, current);
            let mut now = start;
            let mut previous: Option<u32> = None;
            for (is_poke, poke_ms, concurrency, arrivals, held, ready) in steps {
                let span = if is_poke { Duration::from_millis(poke_ms) } else { TICK };
                now += span;
                decider.record(Sample { end: now, span, concurrency, arrivals, held });
                let decision = decider.decide(now, ready);
                let desired = decision.desired;
                prop_assert!(desired >= policy.min && desired <= policy.max, "{desired} outside: {decision:?}");
                if now - start < policy.stable_window {
                    prop_assert!(desired >= current.min(policy.max), "below {current} in warm-up: {decision:?}");
                }
                if let (Mode::Panic, Some(before)) = (decision.mode, previous) {
                    prop_assert!(desired >= before, "panic lowered {before} to {desired}: {decision:?}");
                }
                previous = Some(desired);
            }
        }
    }
}
