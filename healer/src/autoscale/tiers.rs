//! From a desired count to steps on instances, through the tiers: serving, standby (hibernated, woken
//! in well under a second), stopped (a cold start). Scaling up wakes standby instances first, then
//! starts stopped ones (those that ran before, then those that never did); scaling down hibernates into
//! the standby tier while it has room, and stops the rest. Plain data in, steps out: the scaler sends
//! the steps through the safety gate, and instances that are busy with an operation are left alone
//! until it ends (the next decision counts them again).

use crate::lifecycle::Goal;
use crate::rules::{Action, InstanceState};
pub use crate::supervisor::Member;

/// The instances of a service by tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tiers {
    /// Meant to serve: active, or starting, waking, restarting on the way there.
    pub serving: u32,
    /// Active and ready now.
    pub ready: u32,
    /// Hibernated, or on the way there.
    pub standby: u32,
    /// Stopped until needed, or on the way there.
    pub stopped: u32,
}

/// Counts `members` by the tier their goal puts them in.
pub fn tiers(members: &[Member]) -> Tiers {
    let mut t = Tiers::default();
    for m in members {
        match m.goal {
            Goal::Serve => t.serving += 1,
            Goal::Standby => t.standby += 1,
            Goal::Parked | Goal::Shutdown => t.stopped += 1,
        }
        if m.state == InstanceState::Active {
            t.ready += 1;
        }
    }
    t
}

/// One step towards the desired count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub id: String,
}

/// The steps that bring `members` towards `desired` serving instances with at most `standby_room`
/// instances in the standby tier. Steps are only planned for instances that can take them now.
pub fn plan(members: &[Member], desired: u32, standby_room: u32) -> Vec<Step> {
    let t = tiers(members);
    let mut steps = Vec::new();
    let step = |action, m: &Member| Step { action, id: m.id.clone() };
    let idle = |m: &&Member| !m.busy;
    if desired > t.serving {
        let mut need = (desired - t.serving) as usize;
        for m in hibernated(members).into_iter().take(need) {
            steps.push(step(Action::Wake, m));
            need -= 1;
        }
        let mut stopped: Vec<&Member> =
            members.iter().filter(idle).filter(|m| m.goal == Goal::Parked).collect();
        stopped.sort_by_key(|m| (!m.ran, m.index));
        steps.extend(stopped.into_iter().take(need).map(|m| step(Action::Start, m)));
        return steps;
    }
    let mut room = standby_room.saturating_sub(t.standby);
    if desired < t.serving {
        // Wait for instances on their way to serving (starting, waking) to get there: taking a ready one
        // out now could leave none ready in between.
        if members.iter().any(|m| m.goal == Goal::Serve && m.busy) {
            return steps;
        }
        // Leave the highest indexes first; an instance that is not ready (crashed, waiting out its
        // backoff) goes before one that serves.
        let mut serving: Vec<&Member> =
            members.iter().filter(idle).filter(|m| m.goal == Goal::Serve).collect();
        serving.sort_by_key(|m| (m.state == InstanceState::Active, std::cmp::Reverse(m.index)));
        for m in serving.into_iter().take((t.serving - desired) as usize) {
            if room > 0 && m.state == InstanceState::Active {
                room -= 1;
                steps.push(step(Action::Hibernate, m));
            } else {
                steps.push(step(Action::Stop, m));
            }
        }
        return steps;
    }
    // At the desired count: a standby tier beyond its room (the room shrank) gives up its highest.
    if t.standby > standby_room {
        let extra = (t.standby - standby_room) as usize;
        steps.extend(hibernated(members).into_iter().rev().take(extra).map(|m| step(Action::Stop, m)));
    }
    steps
}

/// The standby tier's idle members, lowest index first.
fn hibernated(members: &[Member]) -> Vec<&Member> {
    let mut standby: Vec<&Member> = members
        .iter()
        .filter(|m| !m.busy && m.goal == Goal::Standby && m.state == InstanceState::Hibernated)
        .collect();
    standby.sort_by_key(|m| m.index);
    standby
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState as S;

    fn member(index: u32, state: InstanceState) -> Member {
        let goal = match state {
            S::Active | S::Starting | S::Waking | S::Failed => Goal::Serve,
            S::Hibernating | S::Hibernated => Goal::Standby,
            _ => Goal::Parked,
        };
        let busy = matches!(state, S::Starting | S::Waking | S::Hibernating | S::Stopping);
        let port = 18080 + index as u16;
        Member { id: format!("api-{index}"), index, port, state, goal, busy, ran: state != S::Stopped }
    }

    fn fleet(states: &[InstanceState]) -> Vec<Member> {
        states.iter().enumerate().map(|(i, s)| member(i as u32, *s)).collect()
    }

    fn st(action: Action, id: &str) -> Step {
        Step { action, id: id.to_string() }
    }

    #[test]
    fn scaling_up_wakes_the_standby_tier_first_then_starts_stopped_instances_that_ran() {
        let mut members = fleet(&[S::Active, S::Stopped, S::Hibernated, S::Stopped, S::Hibernated]);
        members[3].ran = true;
        assert_eq!(
            plan(&members, 5, 2),
            [
                st(Action::Wake, "api-2"),
                st(Action::Wake, "api-4"),
                st(Action::Start, "api-3"),
                st(Action::Start, "api-1")
            ]
        );
        assert_eq!(plan(&members, 2, 2), [st(Action::Wake, "api-2")]);
    }

    #[test]
    fn instances_on_their_way_count_and_busy_ones_are_left_alone() {
        // One starting (counts as serving), one hibernating (busy: cannot be woken until it is done).
        let members = fleet(&[S::Starting, S::Hibernating, S::Stopped]);
        assert_eq!(tiers(&members), Tiers { serving: 1, ready: 0, standby: 1, stopped: 1 });
        assert_eq!(plan(&members, 2, 2), [st(Action::Start, "api-2")]);
        assert!(plan(&members, 1, 2).is_empty());
    }

    #[test]
    fn scaling_down_hibernates_while_the_standby_tier_has_room_and_stops_the_rest() {
        let members = fleet(&[S::Active, S::Active, S::Active, S::Active, S::Active]);
        assert_eq!(
            plan(&members, 1, 2),
            [
                st(Action::Hibernate, "api-4"),
                st(Action::Hibernate, "api-3"),
                st(Action::Stop, "api-2"),
                st(Action::Stop, "api-1")
            ]
        );
        // One already in standby leaves room for one more.
        let members = fleet(&[S::Active, S::Active, S::Active, S::Hibernated]);
        assert_eq!(plan(&members, 1, 2), [st(Action::Hibernate, "api-2"), st(Action::Stop, "api-1")]);
        // To zero: the last one goes too.
        let members = fleet(&[S::Active]);
        assert_eq!(plan(&members, 0, 2), [st(Action::Hibernate, "api-0")]);
        assert_eq!(plan(&members, 0, 0), [st(Action::Stop, "api-0")]);
    }

    #[test]
    fn no_ready_instance_leaves_while_another_is_still_starting() {
        let members = fleet(&[S::Active, S::Starting]);
        assert!(plan(&members, 1, 2).is_empty(), "wait for api-1 to be ready first");
        let members = fleet(&[S::Active, S::Active]);
        assert_eq!(plan(&members, 1, 2), [st(Action::Hibernate, "api-1")]);
    }

    #[test]
    fn a_crashed_instance_leaves_before_one_that_serves() {
        let members = fleet(&[S::Active, S::Failed, S::Active]);
        assert_eq!(plan(&members, 2, 2), [st(Action::Stop, "api-1")]);
    }

    #[test]
    fn a_standby_tier_beyond_its_room_gives_up_its_highest() {
        let members = fleet(&[S::Active, S::Hibernated, S::Hibernated, S::Hibernated]);
        assert_eq!(plan(&members, 1, 1), [st(Action::Stop, "api-3"), st(Action::Stop, "api-2")]);
        assert!(plan(&members, 1, 3).is_empty());
    }
}
