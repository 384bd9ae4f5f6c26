//! What every connection shares while kgate runs: the configuration, the data plane
//! and the balancing state of each backend.

use crate::{balance::RoundRobin, config::Config, dataplane::Dataplane};

pub struct Gateway {
    pub config: Config,
    pub dataplane: Dataplane,
    /// One per backend, in the order of `config.backends`.
    pub balancers: Vec<RoundRobin>,
}

impl Gateway {
    pub fn new(config: Config, dataplane: Dataplane) -> Gateway {
        let balancers = config
            .backends
            .iter()
            .map(|_| RoundRobin::default())
            .collect();
        Gateway {
            config,
            dataplane,
            balancers,
        }
    }
}
