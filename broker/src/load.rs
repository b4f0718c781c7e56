//! Load as the autoscaler needs it: per service, the time average of requests in flight at each of its
//! instances and of requests held waiting for one, plus arrivals. A point sample once a tick would miss a
//! burst between two ticks, or see one that already passed; the integral of the level over the interval
//! (its area) does neither. Every change of a level adds the area since the previous change, and
//! [`LoadBook::take`] closes the interval: average = area / span.
//!
//! [`LoadBook`] is plain data over times passed in; [`Load`] puts it behind a lock with the broker's
//! clock, for the hub to feed and the healer's autoscaler to take ([`LoadSource`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vigil_healer::autoscale::signal::{LoadSource, ServiceLoad};

/// One level (requests in flight, or held) and its area since the interval began.
#[derive(Clone, Debug, Default, PartialEq)]
struct Level {
    level: u32,
    /// When `level` last changed (or the interval began).
    since: Duration,
    /// ∫ level dt over the interval so far, in request-seconds.
    area: f64,
}

impl Level {
    fn advance(&mut self, now: Duration) {
        let dt = now.saturating_sub(self.since).as_secs_f64();
        self.area += f64::from(self.level) * dt;
        self.since = self.since.max(now);
    }

    fn change(&mut self, now: Duration, up: bool) {
        self.advance(now);
        self.level = if up { self.level.saturating_add(1) } else { self.level.saturating_sub(1) };
    }

    /// The area of the interval ending `now`; a new interval begins.
    fn close(&mut self, now: Duration) -> f64 {
        self.advance(now);
        std::mem::take(&mut self.area)
    }
}

#[derive(Debug, Default)]
struct ServiceBook {
    /// When the current interval began.
    began: Duration,
    held: Level,
    inflight: HashMap<Arc<str>, Level>,
    arrivals: u64,
}

/// Every service's levels, over times passed in.
#[derive(Debug, Default)]
pub struct LoadBook {
    services: HashMap<Arc<str>, ServiceBook>,
}

impl LoadBook {
    fn service(&mut self, service: &str, now: Duration) -> &mut ServiceBook {
        if !self.services.contains_key(service) {
            self.services.insert(Arc::from(service), ServiceBook { began: now, ..ServiceBook::default() });
        }
        self.services.get_mut(service).expect("inserted above")
    }

    /// A request for `service` arrived.
    pub fn arrived(&mut self, service: &str, now: Duration) {
        self.service(service, now).arrivals += 1;
    }

    /// A request began (`up`) or stopped (`!up`) waiting for an instance of `service`.
    pub fn held(&mut self, service: &str, now: Duration, up: bool) {
        self.service(service, now).held.change(now, up);
    }

    /// A request was handed to (`up`) or came back from (`!up`) `instance` of `service`.
    pub fn inflight(&mut self, service: &str, instance: &Arc<str>, now: Duration, up: bool) {
        let book = self.service(service, now);
        let began = book.began;
        book.inflight
            .entry(instance.clone())
            .or_insert_with(|| Level { since: began, ..Level::default() })
            .change(now, up);
    }

    /// Closes `service`'s interval at `now` and says what it held; the next interval begins at `now`.
    /// A service never seen gives an empty load over no time.
    pub fn take(&mut self, service: &str, now: Duration) -> ServiceLoad {
        let Some(book) = self.services.get_mut(service) else { return ServiceLoad::default() };
        let span = now.saturating_sub(book.began);
        book.began = now;
        let secs = span.as_secs_f64();
        let average = |area: f64| if secs > 0.0 { area / secs } else { 0.0 };
        let held_now = book.held.level;
        let held = average(book.held.close(now));
        let inflight_by_instance =
            book.inflight.iter_mut().map(|(id, l)| (id.to_string(), average(l.close(now)))).collect();
        // Instances with nothing in flight and nothing over the interval are forgotten (scaled away).
        book.inflight.retain(|_, l| l.level > 0);
        let arrivals = std::mem::take(&mut book.arrivals);
        ServiceLoad { span, inflight_by_instance, held, held_now, arrivals }
    }
}

/// The broker's [`LoadBook`], on its monotonic clock.
pub struct Load {
    started: Instant,
    book: Mutex<LoadBook>,
}

impl Default for Load {
    fn default() -> Self {
        Self { started: Instant::now(), book: Mutex::new(LoadBook::default()) }
    }
}

impl Load {
    fn book(&self) -> MutexGuard<'_, LoadBook> {
        // Plain counters: a panic elsewhere leaves them usable.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn arrived(&self, service: &str) {
        let now = self.now();
        self.book().arrived(service, now);
    }

    pub fn held(&self, service: &str, up: bool) {
        let now = self.now();
        self.book().held(service, now, up);
    }

    pub fn inflight(&self, service: &str, instance: &Arc<str>, up: bool) {
        let now = self.now();
        self.book().inflight(service, instance, now, up);
    }
}

impl LoadSource for Load {
    fn take(&self, service: &str) -> ServiceLoad {
        let now = self.now();
        self.book().take(service, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_average_is_the_area_over_the_span_not_a_point_sample() {
        let mut book = LoadBook::default();
        let a: Arc<str> = Arc::from("svc-0");
        book.arrived("svc", ms(0));
        // Two requests for the first quarter second, one for the next quarter, none after: a point sample
        // at the end of the second would see zero.
        book.inflight("svc", &a, ms(0), true);
        book.inflight("svc", &a, ms(0), true);
        book.inflight("svc", &a, ms(250), false);
        book.inflight("svc", &a, ms(500), false);
        let load = book.take("svc", ms(1000));
        assert_eq!(load.span, ms(1000));
        assert!((load.inflight_by_instance["svc-0"] - 0.75).abs() < 1e-9, "{load:?}");
        assert_eq!(load.arrivals, 1);
        assert!((load.concurrency() - 0.75).abs() < 1e-9);
    }

    #[test]
    fn held_requests_count_as_demand_and_carry_over_intervals() {
        let mut book = LoadBook::default();
        book.arrived("svc", ms(0));
        book.held("svc", ms(0), true);
        book.arrived("svc", ms(500));
        book.held("svc", ms(500), true);
        let first = book.take("svc", ms(1000));
        assert!((first.held - 1.5).abs() < 1e-9, "{first:?}");
        assert_eq!((first.held_now, first.arrivals), (2, 2));
        // Still held for the whole next interval; then handed to an instance half way through a third.
        let second = book.take("svc", ms(2000));
        assert!((second.held - 2.0).abs() < 1e-9);
        assert_eq!(second.arrivals, 0);
        let a: Arc<str> = Arc::from("svc-0");
        for _ in 0..2 {
            book.held("svc", ms(2500), false);
            book.inflight("svc", &a, ms(2500), true);
        }
        let third = book.take("svc", ms(3000));
        assert!((third.held - 1.0).abs() < 1e-9);
        assert!((third.inflight_by_instance["svc-0"] - 1.0).abs() < 1e-9);
        assert!((third.concurrency() - 2.0).abs() < 1e-9);
        assert_eq!(third.held_now, 0);
    }

    #[test]
    fn services_have_their_own_intervals_and_idle_instances_are_forgotten() {
        let mut book = LoadBook::default();
        let a: Arc<str> = Arc::from("a-0");
        book.inflight("a", &a, ms(100), true);
        book.inflight("b", &Arc::from("b-0"), ms(100), true);
        // A poke closes a's interval early; b's goes on.
        let poke = book.take("a", ms(300));
        assert_eq!(poke.span, ms(200));
        assert!((poke.inflight_by_instance["a-0"] - 1.0).abs() < 1e-9);
        book.inflight("a", &a, ms(400), false);
        let a_tick = book.take("a", ms(1300));
        assert_eq!(a_tick.span, ms(1000));
        assert!((a_tick.inflight_by_instance["a-0"] - 0.1).abs() < 1e-9);
        let b_tick = book.take("b", ms(1300));
        assert_eq!(b_tick.span, ms(1200));
        assert!((b_tick.inflight_by_instance["b-0"] - 1.0).abs() < 1e-9);
        // a-0 ended idle: the next interval no longer lists it.
        assert!(book.take("a", ms(2300)).inflight_by_instance.is_empty());
        assert_eq!(book.take("unknown", ms(2300)), ServiceLoad::default());
    }

    #[test]
    fn a_release_without_a_lease_never_underflows() {
        let mut book = LoadBook::default();
        book.held("svc", ms(0), false);
        let load = book.take("svc", ms(1000));
        assert_eq!((load.held, load.held_now), (0.0, 0));
    }
}
