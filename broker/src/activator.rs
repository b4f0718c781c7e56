//! The healer as the broker's activator: managed instances become HTTP endpoints (ready while active and
//! not drained by a workflow), a change of any instance's state reaches the broker at once, and demand for
//! a service wakes an instance.

use std::net::SocketAddr;

use tokio::sync::watch;
use vigil_healer::rules::InstanceState;
use vigil_healer::run::HealerHandle;

use crate::hub::{Activator, ManagedEndpoint};

impl Activator for HealerHandle {
    fn demand(&self, service: &str) {
        HealerHandle::demand(self, service);
    }

    fn endpoints(&self) -> Vec<ManagedEndpoint> {
        self.instances()
            .into_iter()
            .map(|i| ManagedEndpoint {
                version: i.version,
                address: SocketAddr::from(([127, 0, 0, 1], i.port)),
                // A workflow's drain takes an instance out of routing while it stays up.
                ready: i.state == InstanceState::Active && self.routable(&i.id),
                state: i.state.as_str(),
                service: i.serves,
                instance_id: i.id,
            })
            .collect()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        HealerHandle::changes(self)
    }
}
