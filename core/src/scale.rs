//! A service's `scale:` block: how the autoscaler sizes it. Plain numbers and durations, read from the
//! config (every key optional, defaults as Knative's KPA has them where it has them) and checked as a whole
//! by [`ScalePolicy::problems`] against the decision tick (`collector.interval`).

use std::time::Duration;

use serde::Serialize;

use crate::values::HumanDuration;

/// How a service scales. Validated by [`ScalePolicy::problems`]; the decision assumes a policy without
/// problems (it stays total on others, but its counts then mean little).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(from = "ScaleYaml")]
pub struct ScalePolicy {
    /// Never fewer instances; above 0 the service never scales to zero.
    pub min: u32,
    /// Never more instances.
    pub max: u32,
    /// Requests one instance is built to serve at once.
    pub target_concurrency: f64,
    /// The fraction of `target_concurrency` to aim for, leaving headroom for bursts while a new instance
    /// starts.
    pub target_utilization: f64,
    /// Instances kept in low-power standby beyond the desired count rather than stopped, so a rise wakes
    /// them instead of starting new ones. Carried out by the scaler's executor; the decision only
    /// validates it.
    pub standby: u32,
    /// The window whose average sets the count in normal operation, and how long panic outlives its cause.
    pub stable_window: Duration,
    /// The short window that detects bursts.
    pub panic_window: Duration,
    /// Panic begins when demand over the panic window reaches this multiple of the ready capacity.
    pub panic_threshold: f64,
    /// A lower count is applied only once it has been the decision for this long.
    pub scale_down_delay: Duration,
    /// The last instance stops only after this long without any request.
    pub zero_grace: Duration,
    /// One decision asks for at most this multiple of the ready instances.
    pub max_scale_up_rate: f64,
    /// One decision keeps at least the ready instances divided by this.
    pub max_scale_down_rate: f64,
}

impl Default for ScalePolicy {
    fn default() -> Self {
        Self {
            min: 0,
            max: 8,
            target_concurrency: 10.0,
            target_utilization: 0.7,
            standby: 2,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            scale_down_delay: Duration::from_secs(30),
            zero_grace: Duration::from_secs(30),
            max_scale_up_rate: 10.0,
            max_scale_down_rate: 2.0,
        }
    }
}

impl ScalePolicy {
    /// The concurrency one instance is scaled for: `target_concurrency × target_utilization`.
    pub fn per_instance_target(&self) -> f64 {
        self.target_concurrency * self.target_utilization
    }

    /// Everything wrong with the policy when decisions are taken every `tick`, as `(field, message)` with
    /// the offending values in the message; empty when the policy is usable. All problems at once, so a
    /// config file is fixed in one pass.
    ///
    /// The rates and the panic threshold are ratios: a scale-up rate of exactly 1 could never add an
    /// instance beyond those ready, a scale-down rate of 1 could never remove one (`min` says that
    /// better), and a panic threshold below 1 would panic while demand is under capacity, i.e. in
    /// ordinary operation, and so never scale down. A threshold of exactly 1 is allowed: panic as soon as
    /// demand reaches capacity.
    pub fn problems(&self, tick: Duration) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.min > self.max {
            problems.push(("min", format!("min ({}) is greater than max ({})", self.min, self.max)));
        }
        if self.max == 0 {
            problems.push(("max", "max is 0: the service could never run an instance".to_string()));
        }
        if !(self.target_concurrency.is_finite() && self.target_concurrency > 0.0) {
            problems.push((
                "target_concurrency",
                format!("must be a finite number above 0, got {}", self.target_concurrency),
            ));
        }
        if !(self.target_utilization > 0.0 && self.target_utilization <= 1.0) {
            problems.push((
                "target_utilization",
                format!("must be above 0 and at most 1, got {}", self.target_utilization),
            ));
        }
        for (field, rate) in
            [("max_scale_up_rate", self.max_scale_up_rate), ("max_scale_down_rate", self.max_scale_down_rate)]
        {
            if !(rate.is_finite() && rate > 1.0) {
                problems.push((field, format!("must be a finite number greater than 1, got {rate}")));
            }
        }
        if !(self.panic_threshold.is_finite() && self.panic_threshold >= 1.0) {
            problems.push((
                "panic_threshold",
                format!("must be a finite number of at least 1, got {}", self.panic_threshold),
            ));
        }
        for (field, window) in [("stable_window", self.stable_window), ("panic_window", self.panic_window)] {
            if window < tick {
                problems.push((
                    field,
                    format!(
                        "{window:?} is shorter than the decision tick ({tick:?}): it would hold no sample"
                    ),
                ));
            }
        }
        if self.panic_window > self.stable_window {
            problems.push((
                "panic_window",
                format!(
                    "{:?} is longer than stable_window ({:?}): panic must react faster than the stable average",
                    self.panic_window, self.stable_window
                ),
            ));
        }
        if self.standby > self.max {
            problems
                .push(("standby", format!("standby ({}) is greater than max ({})", self.standby, self.max)));
        }
        problems
    }
}

/// `scale:` as written: every key optional.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ScaleYaml {
    min: u32,
    max: u32,
    target_concurrency: f64,
    target_utilization: f64,
    standby: u32,
    stable_window: HumanDuration,
    panic_window: HumanDuration,
    panic_threshold: f64,
    scale_down_delay: HumanDuration,
    zero_grace: HumanDuration,
    max_scale_up_rate: f64,
    max_scale_down_rate: f64,
}

impl Default for ScaleYaml {
    fn default() -> Self {
        let p = ScalePolicy::default();
        ScaleYaml {
            min: p.min,
            max: p.max,
            target_concurrency: p.target_concurrency,
            target_utilization: p.target_utilization,
            standby: p.standby,
            stable_window: HumanDuration(p.stable_window),
            panic_window: HumanDuration(p.panic_window),
            panic_threshold: p.panic_threshold,
            scale_down_delay: HumanDuration(p.scale_down_delay),
            zero_grace: HumanDuration(p.zero_grace),
            max_scale_up_rate: p.max_scale_up_rate,
            max_scale_down_rate: p.max_scale_down_rate,
        }
    }
}

impl From<ScaleYaml> for ScalePolicy {
    fn from(y: ScaleYaml) -> Self {
        ScalePolicy {
            min: y.min,
            max: y.max,
            target_concurrency: y.target_concurrency,
            target_utilization: y.target_utilization,
            standby: y.standby,
            stable_window: y.stable_window.0,
            panic_window: y.panic_window.0,
            panic_threshold: y.panic_threshold,
            scale_down_delay: y.scale_down_delay.0,
            zero_grace: y.zero_grace.0,
            max_scale_up_rate: y.max_scale_up_rate,
            max_scale_down_rate: y.max_scale_down_rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_secs(1);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_default_policy_has_no_problems() {
        assert_eq!(ScalePolicy::default().problems(TICK), vec![]);
    }

    #[test]
    fn problems_name_each_bad_field_with_its_value() {
        let fields = |policy: ScalePolicy| -> Vec<&'static str> {
            policy.problems(TICK).into_iter().map(|(field, _)| field).collect()
        };
        let d = ScalePolicy::default;
        assert_eq!(fields(ScalePolicy { min: 9, ..d() }), vec!["min"]);
        assert_eq!(fields(ScalePolicy { max: 0, standby: 0, ..d() }), vec!["max"]);
        assert_eq!(fields(ScalePolicy { target_concurrency: 0.0, ..d() }), vec!["target_concurrency"]);
        assert_eq!(fields(ScalePolicy { target_concurrency: f64::NAN, ..d() }), vec!["target_concurrency"]);
        assert_eq!(
            fields(ScalePolicy { target_concurrency: f64::INFINITY, ..d() }),
            vec!["target_concurrency"]
        );
        assert_eq!(fields(ScalePolicy { target_utilization: 0.0, ..d() }), vec!["target_utilization"]);
        assert_eq!(fields(ScalePolicy { target_utilization: 1.5, ..d() }), vec!["target_utilization"]);
        assert_eq!(fields(ScalePolicy { target_utilization: 1.0, ..d() }), Vec::<&str>::new());
        assert_eq!(fields(ScalePolicy { max_scale_up_rate: 0.5, ..d() }), vec!["max_scale_up_rate"]);
        assert_eq!(fields(ScalePolicy { max_scale_up_rate: 1.0, ..d() }), vec!["max_scale_up_rate"]);
        assert_eq!(fields(ScalePolicy { max_scale_down_rate: f64::NAN, ..d() }), vec!["max_scale_down_rate"]);
        assert_eq!(fields(ScalePolicy { panic_threshold: 0.9, ..d() }), vec!["panic_threshold"]);
        assert_eq!(fields(ScalePolicy { panic_threshold: 1.0, ..d() }), Vec::<&str>::new());
        assert_eq!(
            fields(ScalePolicy {
                stable_window: Duration::from_millis(500),
                panic_window: Duration::from_millis(500),
                ..d()
            }),
            vec!["stable_window", "panic_window"]
        );
        assert_eq!(fields(ScalePolicy { panic_window: secs(90), ..d() }), vec!["panic_window"]);
        assert_eq!(fields(ScalePolicy { standby: 9, ..d() }), vec!["standby"]);

        let problems = ScalePolicy { min: 9, panic_window: secs(90), ..d() }.problems(TICK);
        assert_eq!(problems[0], ("min", "min (9) is greater than max (8)".to_string()));
        assert_eq!(problems[1].0, "panic_window");
        assert!(problems[1].1.contains("90s") && problems[1].1.contains("60s"), "{problems:?}");
    }

    #[test]
    fn every_key_is_optional_and_durations_read_as_durations() {
        let p: ScalePolicy = serde_saphyr::from_str("{}").unwrap();
        assert_eq!(p, ScalePolicy::default());
        let p: ScalePolicy = serde_saphyr::from_str(
            "min: 1\nmax: 4\nstable_window: 10s\npanic_window: 2s\nzero_grace: 500ms\n",
        )
        .unwrap();
        assert_eq!((p.min, p.max, p.stable_window, p.panic_window), (1, 4, secs(10), secs(2)));
        assert_eq!(p.zero_grace, Duration::from_millis(500));
        assert!(serde_saphyr::from_str::<ScalePolicy>("stable_window: 10\n").is_err());
        assert!(serde_saphyr::from_str::<ScalePolicy>("minimum: 1\n").is_err());
    }
}
