//! The lifecycle of one managed instance as plain data: what Vigil knows about the instance (its facts),
//! what it should be (its goal), and the one operation under way. Requests (hibernate, wake, restart,
//! stop, start, shutdown) change the goal; events (spawned, ready, hibernated, hook failed, exited, ...)
//! change the facts; [`Lifecycle::next_op`] picks the step that brings the facts towards the goal, the
//! way a kube-runtime reconciler does. The state shown to users ([`InstanceState`]) is derived from
//! facts and operation, so it can never disagree with them.
//!
//! Failure edges are facts like any other: a hibernate that failed after touching the cgroup leaves it
//! "maybe frozen, maybe squeezed", and the next step is a restore (thaw, lift the CPU limits), retried up
//! to [`MAX_RESTORE_ATTEMPTS`] times before the process is replaced; a failed wake or a readiness failure
//! replaces the process; a crash waits out the backoff and starts again. Every state is either serving,
//! a goal reached on purpose, or has its next operation scheduled (the proptests below check this from
//! any state under any sequence of events).

use std::time::Duration;

use crate::rules::InstanceState;

/// A restore (thaw + lift CPU limits) is tried this many times before the process is restarted.
pub const MAX_RESTORE_ATTEMPTS: u32 = 3;

/// What the instance should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Running and ready, at full CPU.
    Serve,
    /// Running in the low-power standby.
    Standby,
    /// Stopped until demand or the autoscaler starts it (a `start: on_demand` service at zero, or an
    /// instance a `scale:` service does not need now).
    Parked,
    /// Stopped for good: Vigil is shutting down.
    Shutdown,
}

/// The one operation under way for an instance. The owner of the instance runs it and reports its
/// outcome as an [`Event`]; `Probe` and `Backoff` may be abandoned at any time (they change nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Reset the cgroup (thaw, lift CPU limits) and start the process in it.
    Spawn,
    /// Run the readiness check until it passes or times out.
    Probe,
    /// Drain, pre-hibernate hook, freeze, page out, squeeze the CPU, thaw.
    Hibernate,
    /// Lift the CPU limits, prefetch, post-wake hook, readiness.
    Wake,
    /// Thaw and lift the CPU limits of a process that should keep serving.
    Restore,
    /// Thaw, SIGTERM, SIGKILL after the grace period, reap.
    Stop,
    /// Wait before starting a crashed instance again.
    Backoff(Duration),
}

impl Op {
    /// Whether abandoning the operation midway leaves nothing behind.
    pub fn abandonable(self) -> bool {
        matches!(self, Op::Probe | Op::Backoff(_))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Spawn => "spawn",
            Op::Probe => "probe",
            Op::Hibernate => "hibernate",
            Op::Wake => "wake",
            Op::Restore => "restore",
            Op::Stop => "stop",
            Op::Backoff(_) => "backoff",
        }
    }
}

/// What someone asks of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Hibernate,
    Wake,
    Restart,
    /// Stop until demand (on-demand services only).
    Stop,
    /// Start a parked instance (demand).
    Start,
    Shutdown,
}

impl Request {
    /// The state a request aims at; reaching another one means it failed.
    pub fn target(self) -> InstanceState {
        match self {
            Request::Hibernate => InstanceState::Hibernated,
            Request::Wake | Request::Restart | Request::Start => InstanceState::Active,
            Request::Stop | Request::Shutdown => InstanceState::Stopped,
        }
    }
}

/// The outcome of an operation, or something that happened to the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Spawned,
    SpawnFailed(String),
    Ready,
    /// The readiness check did not pass in time.
    NotReady(String),
    Hibernated,
    /// The pre-hibernate hook (or the drain) failed before the cgroup was touched.
    HookFailed(String),
    /// Hibernation failed after it began to change the cgroup.
    HibernateFailed(String),
    Woken,
    WakeFailed(String),
    Restored,
    RestoreFailed(String),
    /// The process was stopped on purpose and reaped.
    Stopped,
    BackoffElapsed,
    /// The process ended by itself.
    Exited {
        healthy_for: Duration,
        status: String,
    },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The goal changed; operations follow.
    Accepted,
    /// The instance already is what was asked.
    AlreadyThere,
    /// An operation is under way; ask again when it ends.
    Busy(InstanceState),
    /// The request makes no sense in this state.
    Refused(String),
}

/// One instance's facts, goal and operation.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    goal: Goal,
    /// It may be stopped until needed (`start: on_demand` and `scale:` services).
    stoppable: bool,
    running: bool,
    ready: bool,
    /// The cgroup may be frozen (a thaw failed or a hibernate broke off).
    frozen: bool,
    /// The cgroup may hold the standby CPU limits.
    squeezed: bool,
    /// Hibernation completed: memory paged out, working set recorded.
    standby: bool,
    /// The process must be replaced before the instance serves again.
    replace: bool,
    /// The last run ended unexpectedly: wait out the backoff before the next start.
    crashed: bool,
    in_flight: Option<Op>,
    restore_failures: u32,
    backoff: Backoff,
    spawns: u32,
    last_failure: Option<String>,
    /// The first failure since the last accepted request, for its answer.
    request_failure: Option<String>,
}

impl Lifecycle {
    /// A new instance: it starts at once, or (on demand) waits parked for demand.
    pub fn new(on_demand: bool) -> Lifecycle {
        Lifecycle::with_start(!on_demand, on_demand)
    }

    /// A new instance that starts at once (`serve`) or waits parked, and that may (`stoppable`) or may not
    /// be stopped until needed.
    pub fn with_start(serve: bool, stoppable: bool) -> Lifecycle {
        Lifecycle {
            goal: if serve { Goal::Serve } else { Goal::Parked },
            stoppable,
            running: false,
            ready: false,
            frozen: false,
            squeezed: false,
            standby: false,
            replace: false,
            crashed: false,
            in_flight: None,
            restore_failures: 0,
            backoff: Backoff::new(),
            spawns: 0,
            last_failure: None,
            request_failure: None,
        }
    }

    pub fn goal(&self) -> Goal {
        self.goal
    }

    pub fn in_flight(&self) -> Option<Op> {
        self.in_flight
    }

    pub fn running(&self) -> bool {
        self.running
    }

    /// Whether the process was ever started.
    pub fn ran(&self) -> bool {
        self.spawns > 0
    }

    /// How often the process was started again after its first start.
    pub fn restarts(&self) -> u32 {
        self.spawns.saturating_sub(1)
    }

    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// The first failure since the last accepted request.
    pub fn request_failure(&self) -> Option<&str> {
        self.request_failure.as_deref()
    }

    /// The state users see, derived from the facts and the operation under way.
    pub fn state(&self) -> InstanceState {
        use InstanceState as S;
        match self.in_flight {
            Some(Op::Spawn | Op::Probe) => S::Starting,
            Some(Op::Stop) => S::Stopping,
            Some(Op::Backoff(_)) => S::Failed,
            Some(_) if !self.running => S::Failed,
            Some(Op::Hibernate) => S::Hibernating,
            Some(Op::Wake | Op::Restore) => S::Waking,
            None if !self.running => match self.goal {
                Goal::Parked | Goal::Shutdown => S::Stopped,
                Goal::Serve | Goal::Standby => S::Failed,
            },
            None if self.standby && !self.frozen => S::Hibernated,
            None if self.ready && !self.frozen && !self.squeezed && !self.replace => S::Active,
            None => S::Starting,
        }
    }

    /// True when nothing is under way but, at most, a backoff timer: the state is one to report.
    pub fn settled(&self) -> bool {
        matches!(self.in_flight, None | Some(Op::Backoff(_)))
    }

    fn fail(&mut self, reason: String) {
        if self.request_failure.is_none() {
            self.request_failure = Some(reason.clone());
        }
        self.last_failure = Some(reason);
    }

    /// Stops for good: abandons a probe or backoff under way; anything else finishes first.
    fn shut_down(&mut self) -> Answer {
        self.goal = Goal::Shutdown;
        if self.in_flight.is_some_and(Op::abandonable) {
            self.in_flight = None;
        }
        self.request_failure = None;
        Answer::Accepted
    }

    /// Takes a request. On [`Answer::Accepted`] call [`Lifecycle::next_op`] and run what it returns.
    pub fn request(&mut self, request: Request) -> Answer {
        let state = self.state();
        let busy = self.in_flight.is_some_and(|op| !matches!(op, Op::Backoff(_)));
        // Shutdown is taken in any state, busy or not; everything else waits for the operation under way.
        if request == Request::Shutdown {
            return self.shut_down();
        }
        if self.goal == Goal::Shutdown {
            return Answer::Refused("Vigil is shutting down".into());
        }
        if busy {
            return Answer::Busy(state);
        }
        let refused = |what: &str| Answer::Refused(format!("{what} a {} instance", state.as_str()));
        let answer = match request {
            Request::Hibernate => match state {
                InstanceState::Hibernated => Answer::AlreadyThere,
                InstanceState::Active => {
                    self.goal = Goal::Standby;
                    Answer::Accepted
                }
                _ => refused("cannot hibernate"),
            },
            Request::Wake => match state {
                InstanceState::Active => Answer::AlreadyThere,
                InstanceState::Hibernated => {
                    self.goal = Goal::Serve;
                    Answer::Accepted
                }
                _ => refused("cannot wake"),
            },
            Request::Restart => match self.goal {
                Goal::Parked => refused("cannot restart (it starts on demand)"),
                _ => {
                    self.goal = Goal::Serve;
                    if self.running {
                        self.replace = true;
                    }
                    // A restart asked for now does not wait out a crash's backoff.
                    self.crashed = false;
                    self.in_flight = None;
                    Answer::Accepted
                }
            },
            Request::Stop => {
                if !self.stoppable {
                    Answer::Refused(
                        "only instances of `start: on_demand` or `scale:` services stop until needed".into(),
                    )
                } else if self.goal == Goal::Parked {
                    Answer::AlreadyThere
                } else {
                    self.goal = Goal::Parked;
                    self.in_flight = None;
                    Answer::Accepted
                }
            }
            Request::Start => match self.goal {
                Goal::Parked => {
                    self.goal = Goal::Serve;
                    self.crashed = false;
                    Answer::Accepted
                }
                _ if state == InstanceState::Active => Answer::AlreadyThere,
                _ => refused("cannot start"),
            },
            Request::Shutdown => self.shut_down(),
        };
        if answer == Answer::Accepted {
            self.request_failure = None;
        }
        answer
    }

    /// The next operation towards the goal, now marked as under way; `None` when there is nothing to do
    /// (the goal is reached) or something is already under way.
    pub fn next_op(&mut self) -> Option<Op> {
        if self.in_flight.is_some() {
            return None;
        }
        let op = self.choose()?;
        if op == Op::Spawn {
            self.spawns = self.spawns.saturating_add(1);
        }
        self.in_flight = Some(op);
        Some(op)
    }

    fn choose(&mut self) -> Option<Op> {
        match self.goal {
            Goal::Parked | Goal::Shutdown => return self.running.then_some(Op::Stop),
            Goal::Serve | Goal::Standby => {}
        }
        if !self.running {
            if self.crashed {
                return Some(Op::Backoff(self.backoff.next_delay()));
            }
            return Some(Op::Spawn);
        }
        if self.replace {
            return Some(Op::Stop);
        }
        if self.goal == Goal::Standby {
            if self.standby {
                return None;
            }
            if self.ready && !self.frozen && !self.squeezed {
                return Some(Op::Hibernate);
            }
        }
        if self.standby && self.goal == Goal::Serve {
            return Some(Op::Wake);
        }
        if self.frozen || self.squeezed {
            return Some(Op::Restore);
        }
        if !self.ready {
            return Some(Op::Probe);
        }
        None
    }

    /// Applies the outcome of an operation or a change of the process. Outcomes of an operation that is
    /// not under way are stale and change nothing (returns false).
    pub fn apply(&mut self, event: Event) -> bool {
        let expected = match &event {
            Event::Spawned | Event::SpawnFailed(_) => Some(Op::Spawn),
            Event::Ready | Event::NotReady(_) => Some(Op::Probe),
            Event::Hibernated | Event::HookFailed(_) | Event::HibernateFailed(_) => Some(Op::Hibernate),
            Event::Woken | Event::WakeFailed(_) => Some(Op::Wake),
            Event::Restored | Event::RestoreFailed(_) => Some(Op::Restore),
            Event::Stopped => Some(Op::Stop),
            Event::BackoffElapsed => None,
            Event::Exited { .. } => None,
        };
        match (&event, self.in_flight) {
            (Event::BackoffElapsed, Some(Op::Backoff(_))) => {}
            (Event::BackoffElapsed, _) => return false,
            // The process is not watched while it is being stopped or started: those ops own it.
            (Event::Exited { .. }, Some(Op::Stop | Op::Spawn)) => return false,
            (Event::Exited { .. }, _) if !self.running => return false,
            (Event::Exited { .. }, _) => {}
            (_, current) if current != expected => return false,
            _ => {}
        }
        if !matches!(event, Event::Exited { .. }) {
            self.in_flight = None;
        }
        match event {
            Event::Spawned => {
                self.running = true;
                self.ready = false;
                self.frozen = false;
                self.squeezed = false;
                self.standby = false;
            }
            Event::SpawnFailed(reason) => {
                self.crashed = true;
                self.fail(reason);
            }
            Event::Ready => {
                self.ready = true;
            }
            Event::NotReady(reason) => {
                // Replace the process, and wait out the backoff so a service that never gets ready
                // is not restarted in a tight loop.
                self.replace = true;
                self.crashed = true;
                self.fail(reason);
            }
            Event::Hibernated => {
                self.standby = true;
                self.squeezed = true;
                self.frozen = false;
            }
            Event::HookFailed(reason) => {
                self.goal = Goal::Serve;
                self.fail(reason);
            }
            Event::HibernateFailed(reason) => {
                self.goal = Goal::Serve;
                self.frozen = true;
                self.squeezed = true;
                self.fail(reason);
            }
            Event::Woken => {
                self.standby = false;
                self.frozen = false;
                self.squeezed = false;
                self.ready = true;
            }
            Event::WakeFailed(reason) => {
                // Whatever the wake got to, the process is replaced: the stop thaws it first and the
                // next start resets the cgroup.
                self.standby = false;
                self.frozen = true;
                self.squeezed = true;
                self.replace = true;
                self.fail(reason);
            }
            Event::Restored => {
                self.frozen = false;
                self.squeezed = false;
                self.restore_failures = 0;
            }
            Event::RestoreFailed(reason) => {
                self.restore_failures = self.restore_failures.saturating_add(1);
                if self.restore_failures >= MAX_RESTORE_ATTEMPTS {
                    self.replace = true;
                    self.restore_failures = 0;
                }
                self.fail(reason);
            }
            Event::Stopped => self.process_gone(),
            Event::BackoffElapsed => self.crashed = false,
            Event::Exited { healthy_for, status } => {
                self.backoff.record_healthy(if self.ready { healthy_for } else { Duration::ZERO });
                self.process_gone();
                if let Some(op) = self.in_flight
                    && op.abandonable()
                {
                    self.in_flight = None;
                }
                if matches!(self.goal, Goal::Serve | Goal::Standby) {
                    self.goal = Goal::Serve;
                    self.crashed = true;
                    self.fail(format!("the process exited: {status}"));
                }
            }
        }
        true
    }

    fn process_gone(&mut self) {
        self.running = false;
        self.ready = false;
        self.standby = false;
        self.replace = false;
        // The cgroup is empty; the next start resets its freezer and CPU limits anyway.
        self.frozen = false;
        self.squeezed = false;
        self.restore_failures = 0;
    }
}

/// Exponential restart delay: 1 s, doubling to at most 30 s, back to 1 s once an instance ran healthy for
/// 60 s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const INITIAL: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(30);
    /// An instance that stayed active this long earns a fresh backoff.
    pub const HEALTHY_RESET: Duration = Duration::from_secs(60);

    pub fn new() -> Backoff {
        Backoff { next: Backoff::INITIAL }
    }

    /// The delay before the next restart; each call doubles the following one up to [`Backoff::MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Backoff::MAX);
        delay
    }

    /// Records how long the instance was healthy (active) before it exited.
    pub fn record_healthy(&mut self, healthy_for: Duration) {
        if healthy_for >= Backoff::HEALTHY_RESET {
            self.next = Backoff::INITIAL;
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use InstanceState as S;

    /// Runs every operation to success until the instance settles; returns the states passed through.
    fn settle(l: &mut Lifecycle) -> Vec<S> {
        let mut seen = Vec::new();
        for _ in 0..20 {
            let Some(op) = l.next_op().or(l.in_flight()) else { break };
            seen.push(l.state());
            let event = success(op);
            assert!(l.apply(event), "{op:?} in flight must take its success");
        }
        seen.push(l.state());
        seen
    }

    fn success(op: Op) -> Event {
        match op {
            Op::Spawn => Event::Spawned,
            Op::Probe => Event::Ready,
            Op::Hibernate => Event::Hibernated,
            Op::Wake => Event::Woken,
            Op::Restore => Event::Restored,
            Op::Stop => Event::Stopped,
            Op::Backoff(_) => Event::BackoffElapsed,
        }
    }

    fn active() -> Lifecycle {
        let mut l = Lifecycle::new(false);
        settle(&mut l);
        assert_eq!(l.state(), S::Active);
        l
    }

    fn hibernated() -> Lifecycle {
        let mut l = active();
        assert_eq!(l.request(Request::Hibernate), Answer::Accepted);
        assert_eq!(settle(&mut l), vec![S::Hibernating, S::Hibernated]);
        l
    }

    #[test]
    fn starts_probes_and_serves() {
        let mut l = Lifecycle::new(false);
        assert_eq!(settle(&mut l), vec![S::Starting, S::Starting, S::Active]);
        assert_eq!(l.restarts(), 0);
    }

    #[test]
    fn hibernate_and_wake_are_idempotent_and_refused_while_busy() {
        let mut l = active();
        assert_eq!(l.request(Request::Wake), Answer::AlreadyThere);
        assert_eq!(l.request(Request::Hibernate), Answer::Accepted);
        assert_eq!(l.next_op(), Some(Op::Hibernate));
        assert_eq!(l.request(Request::Hibernate), Answer::Busy(S::Hibernating));
        assert_eq!(l.request(Request::Wake), Answer::Busy(S::Hibernating));
        assert!(l.apply(Event::Hibernated));
        assert_eq!(l.next_op(), None);
        assert_eq!(l.state(), S::Hibernated);
        assert_eq!(l.request(Request::Hibernate), Answer::AlreadyThere);
        assert_eq!(l.request(Request::Wake), Answer::Accepted);
        assert_eq!(settle(&mut l), vec![S::Waking, S::Active]);
    }

    #[test]
    fn a_failed_pre_hibernate_hook_leaves_it_serving() {
        let mut l = active();
        l.request(Request::Hibernate);
        l.next_op();
        l.apply(Event::HookFailed("exit status 1".into()));
        assert_eq!(l.next_op(), None);
        assert_eq!(l.state(), S::Active);
        assert_eq!(l.request_failure(), Some("exit status 1"));
    }

    #[test]
    fn a_failed_hibernate_restores_and_a_failed_thaw_is_retried_then_restarted() {
        let mut l = active();
        l.request(Request::Hibernate);
        l.next_op();
        l.apply(Event::HibernateFailed("page out: EPERM".into()));
        assert_eq!(l.state(), S::Starting, "maybe frozen: not active");
        assert_eq!(l.next_op(), Some(Op::Restore));
        assert_eq!(l.state(), S::Waking);
        for _ in 1..MAX_RESTORE_ATTEMPTS {
            l.apply(Event::RestoreFailed("thaw: EBUSY".into()));
            assert_eq!(l.next_op(), Some(Op::Restore), "retried");
        }
        l.apply(Event::RestoreFailed("thaw: EBUSY".into()));
        assert_eq!(l.next_op(), Some(Op::Stop), "then the process is replaced");
        assert_eq!(settle(&mut l), vec![S::Stopping, S::Starting, S::Starting, S::Active]);
        assert_eq!(l.restarts(), 1);
        assert_eq!(l.last_failure(), Some("thaw: EBUSY"));
    }

    #[test]
    fn a_failed_wake_restarts_the_instance() {
        let mut l = hibernated();
        l.request(Request::Wake);
        assert_eq!(l.next_op(), Some(Op::Wake));
        l.apply(Event::WakeFailed("post-wake hook: exit status 3".into()));
        assert_eq!(l.state(), S::Starting);
        assert_eq!(settle(&mut l), vec![S::Stopping, S::Starting, S::Starting, S::Active]);
        assert_eq!(l.request_failure(), Some("post-wake hook: exit status 3"));
        assert_eq!(l.restarts(), 1);
    }

    #[test]
    fn a_crash_backs_off_then_starts_again() {
        let mut l = active();
        assert!(l.apply(Event::Exited { healthy_for: Duration::from_secs(5), status: "signal 9".into() }));
        assert_eq!(l.state(), S::Failed);
        assert_eq!(l.next_op(), Some(Op::Backoff(Duration::from_secs(1))));
        assert_eq!(l.state(), S::Failed);
        assert_eq!(settle(&mut l), vec![S::Failed, S::Starting, S::Starting, S::Active]);
        l.apply(Event::Exited { healthy_for: Duration::ZERO, status: "exit 1".into() });
        assert_eq!(l.next_op(), Some(Op::Backoff(Duration::from_secs(2))), "the delay doubles");
        assert_eq!(l.request(Request::Restart), Answer::Accepted, "a restart cuts the backoff short");
        assert_eq!(l.next_op(), Some(Op::Spawn));
    }

    #[test]
    fn a_crash_during_a_hibernate_restarts_once_the_hibernate_reports() {
        let mut l = active();
        l.request(Request::Hibernate);
        l.next_op();
        l.apply(Event::Exited { healthy_for: Duration::ZERO, status: "signal 9".into() });
        assert_eq!(l.state(), S::Failed);
        assert_eq!(l.next_op(), None, "the hibernate still runs");
        l.apply(Event::Hibernated);
        assert_eq!(l.next_op(), Some(Op::Backoff(Duration::from_secs(1))));
        assert_eq!(settle(&mut l).last(), Some(&S::Active));
        assert_eq!(l.goal(), Goal::Serve);
    }

    #[test]
    fn never_ready_is_replaced_with_backoff() {
        let mut l = Lifecycle::new(false);
        l.next_op();
        l.apply(Event::Spawned);
        assert_eq!(l.next_op(), Some(Op::Probe));
        l.apply(Event::NotReady("no answer on :18080 within 30s".into()));
        assert_eq!(l.next_op(), Some(Op::Stop));
        l.apply(Event::Stopped);
        assert_eq!(l.next_op(), Some(Op::Backoff(Duration::from_secs(1))));
    }

    #[test]
    fn on_demand_parks_starts_and_stops() {
        let mut l = Lifecycle::new(true);
        assert_eq!(l.next_op(), None);
        assert_eq!(l.state(), S::Stopped);
        assert_eq!(l.request(Request::Stop), Answer::AlreadyThere);
        assert!(matches!(l.request(Request::Restart), Answer::Refused(_)));
        assert_eq!(l.request(Request::Start), Answer::Accepted);
        assert_eq!(settle(&mut l).last(), Some(&S::Active));
        assert_eq!(l.request(Request::Stop), Answer::Accepted);
        assert_eq!(settle(&mut l), vec![S::Stopping, S::Stopped]);
        let mut always = active();
        assert!(matches!(always.request(Request::Stop), Answer::Refused(_)));
    }

    #[test]
    fn shutdown_stops_whatever_runs_and_refuses_later_requests() {
        let mut l = hibernated();
        assert_eq!(l.request(Request::Shutdown), Answer::Accepted);
        assert_eq!(settle(&mut l), vec![S::Stopping, S::Stopped]);
        assert!(matches!(l.request(Request::Start), Answer::Refused(_)));
        let mut starting = Lifecycle::new(false);
        starting.next_op();
        starting.apply(Event::Spawned);
        starting.next_op();
        assert_eq!(starting.in_flight(), Some(Op::Probe));
        starting.request(Request::Shutdown);
        assert_eq!(starting.next_op(), Some(Op::Stop), "the probe is abandoned");
    }

    #[test]
    fn stale_outcomes_change_nothing() {
        let mut l = active();
        assert!(!l.apply(Event::Woken));
        assert!(!l.apply(Event::BackoffElapsed));
        assert!(!l.apply(Event::Stopped));
        assert_eq!(l.state(), S::Active);
    }

    fn any_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Hibernate),
            Just(Request::Wake),
            Just(Request::Restart),
            Just(Request::Stop),
            Just(Request::Start),
        ]
    }

    fn failure(op: Op) -> Event {
        let r = String::from("injected");
        match op {
            Op::Spawn => Event::SpawnFailed(r),
            Op::Probe => Event::NotReady(r),
            Op::Hibernate => Event::HibernateFailed(r),
            Op::Wake => Event::WakeFailed(r),
            Op::Restore => Event::RestoreFailed(r),
            Op::Stop => Event::Stopped,
            Op::Backoff(_) => Event::BackoffElapsed,
        }
    }

    /// One thing that can happen next: a request, the in-flight op succeeding or failing (its hook
    /// failing, for a hibernate), or the process exiting.
    #[derive(Clone, Debug)]
    enum Step {
        Ask(Request),
        Succeed,
        Fail,
        HookFails,
        Exit,
    }

    fn any_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            any_request().prop_map(Step::Ask),
            Just(Step::Succeed),
            Just(Step::Fail),
            Just(Step::HookFails),
            Just(Step::Exit),
        ]
    }

    /// What must hold after every step, once the owner has started the next operation.
    fn check_invariants(l: &Lifecycle) -> Result<(), TestCaseError> {
        let state = l.state();
        if state == S::Active {
            prop_assert!(l.running && l.ready && !l.frozen && !l.squeezed && !l.standby, "{l:?}");
        }
        if state == S::Hibernated {
            prop_assert!(l.running && !l.frozen, "{l:?}");
        }
        // Never stuck: nothing under way means a reached goal.
        if l.in_flight.is_none() {
            let reached = matches!(
                (l.goal, state),
                (Goal::Serve, S::Active)
                    | (Goal::Standby, S::Hibernated)
                    | (Goal::Parked | Goal::Shutdown, S::Stopped)
            );
            prop_assert!(reached, "idle but not at its goal: {state:?} {l:?}");
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn any_sequence_of_events_leaves_an_instance_serving_recoverable_or_stopped_on_purpose(
            serve in any::<bool>(),
            stoppable in any::<bool>(),
            steps in proptest::collection::vec(any_step(), 0..60),
        ) {
            let mut l = Lifecycle::with_start(serve, stoppable);
            l.next_op();
            for step in steps {
                match step {
                    Step::Ask(r) => { l.request(r); }
                    Step::Succeed => if let Some(op) = l.in_flight() { prop_assert!(l.apply(success(op))); },
                    Step::Fail => if let Some(op) = l.in_flight() { prop_assert!(l.apply(failure(op))); },
                    Step::HookFails => if l.in_flight() == Some(Op::Hibernate) {
                        prop_assert!(l.apply(Event::HookFailed("hook".into())));
                    },
                    Step::Exit => { l.apply(Event::Exited { healthy_for: Duration::ZERO, status: "killed".into() }); }
                }
                l.next_op();
                check_invariants(&l)?;
            }
            // From wherever it is, operations that succeed bring it to its goal within a few steps ...
            let states = settle(&mut l);
            let last = *states.last().unwrap_or(&l.state());
            prop_assert!(l.in_flight().is_none(), "settled: {l:?}");
            // ... and one request leaves any goal again (unless Vigil shuts down).
            let leave = match last {
                S::Active => Some(Request::Hibernate),
                S::Hibernated => Some(Request::Wake),
                S::Stopped if l.goal() == Goal::Parked => Some(Request::Start),
                S::Stopped => None,
                other => return Err(TestCaseError::fail(format!("settled in {other:?}"))),
            };
            if let Some(r) = leave {
                prop_assert_eq!(l.request(r), Answer::Accepted);
                prop_assert!(l.next_op().is_some());
            }
        }
    }

    #[test]
    fn backoff_doubles_to_30s_and_resets_after_a_healthy_minute() {
        let mut b = Backoff::new();
        let secs: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        b.record_healthy(Duration::from_secs(59));
        assert_eq!(b.next_delay(), Duration::from_secs(30));
        b.record_healthy(Duration::from_secs(60));
        assert_eq!(b.next_delay(), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
