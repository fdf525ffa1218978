//! The faults of host groups: a host candidate killed while its host lives, a whole host killed,
//! a host candidate stopped.
//!
//! A host's **candidate** is the one node of its host group that talks to the server for the
//! lock: the node whose proxy carries connections (the followers' carry none). Where several of
//! a host's nodes have connections (no host group at work) one of them is drawn.

use std::time::Duration;

use tower_primary_lab::host::SimulatedHost;
use tower_primary_lab::node::NodeSignal;

use crate::nemesis::{Fault, FaultKind, Nemesis, secs};
use crate::setup::Setup;

type BoxError = Box<dyn std::error::Error>;

impl Nemesis {
    /// The host slot `slot` lives on.
    fn host_of_slot(&self, slot: usize) -> usize {
        slot % self.hosts.len().max(1)
    }

    /// The candidate of `host`: slot and pid.
    fn candidate(&mut self, host: usize, setup: &Setup) -> Option<(usize, u32)> {
        let states = self.cluster.states();
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|s| self.host_of_slot(*s) == host)
            .filter(|s| {
                states
                    .get(&self.slots[*s])
                    .is_none_or(|st| st.alive && !st.stopped)
            })
            .collect();
        let talking: Vec<usize> = live
            .iter()
            .copied()
            .filter(|s| setup.proxy_of(*s).is_some_and(|p| p.connections() > 0))
            .collect();
        let pool = if talking.is_empty() { &live } else { &talking };
        let slot = *pool.get(self.rng.usize(..pool.len().max(1)))?;
        Some((slot, self.slots[slot]))
    }

    /// A candidate to hit: the primary (its host's candidate) most of the time, else the
    /// candidate of a host drawn at random. Slot, pid, and the term when it is the primary.
    fn target_candidate(&mut self, setup: &Setup) -> Option<(usize, u32, Option<u64>)> {
        let primary = self.primary();
        if let Some((slot, pid, term)) = primary
            && self.rng.f64() < self.config.aim
        {
            return Some((slot, pid, Some(term)));
        }
        let host = self.rng.usize(..self.hosts.len().max(1));
        let (slot, pid) = self.candidate(host, setup)?;
        let term = primary.and_then(|(_, p, t)| (p == pid).then_some(t));
        Some((slot, pid, term))
    }

    /// Injects a host-group fault into `fault`; `false` when there was nothing to hit.
    pub(crate) async fn inject_host_fault(
        &mut self,
        kind: FaultKind,
        setup: &Setup,
        fault: &mut Fault,
    ) -> Result<bool, BoxError> {
        match kind {
            FaultKind::WorkerKill => {
                let Some((slot, pid, term)) = self.target_candidate(setup) else {
                    return Ok(false);
                };
                let Ok(at) = self.cluster.signal(pid, NodeSignal::Kill).await else {
                    return Ok(false);
                };
                self.cluster.wait_exit(pid, Duration::from_secs(10)).await?;
                let wait = Duration::from_millis(self.rng.u64(0..=500));
                tokio::time::sleep(wait).await;
                self.respawn(slot)?;
                fault.detail = format!(
                    "SIGKILL the candidate of host {}, its host alive, replaced after {} ms",
                    self.host_of_slot(slot) + 1,
                    wait.as_millis()
                );
                (fault.slot, fault.pid, fault.at, fault.primary_term) =
                    (Some(slot), Some(pid), at, term);
            }
            FaultKind::StopCandidate => {
                let Some((slot, pid, term)) = self.target_candidate(setup) else {
                    return Ok(false);
                };
                let hold = self.hold();
                let Ok(at) = self.cluster.signal(pid, NodeSignal::Stop).await else {
                    return Ok(false);
                };
                tokio::time::sleep(hold).await;
                let _ = self.cluster.signal(pid, NodeSignal::Cont).await;
                fault.detail = format!(
                    "SIGSTOP the candidate of host {} for {}",
                    self.host_of_slot(slot) + 1,
                    secs(hold)
                );
                (fault.slot, fault.pid, fault.at, fault.primary_term) =
                    (Some(slot), Some(pid), at, term);
            }
            FaultKind::HostKill => self.kill_host(fault).await?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `SIGKILL` every process of a host (the primary's most of the time): its nodes, the
    /// primary first, then its namespace's init; the host comes back as a fresh namespace (the
    /// same host directory) and its slots are replaced 0–500 ms later.
    async fn kill_host(&mut self, fault: &mut Fault) -> Result<(), BoxError> {
        let primary = self.primary();
        let host = match primary {
            Some((slot, _, _)) if self.rng.f64() < self.config.aim => self.host_of_slot(slot),
            _ => self.rng.usize(..self.hosts.len().max(1)),
        };
        let mut slots: Vec<usize> = (0..self.slots.len())
            .filter(|s| self.host_of_slot(*s) == host)
            .collect();
        let primary_slot = primary.and_then(|(slot, _, _)| slots.contains(&slot).then_some(slot));
        slots.sort_by_key(|s| Some(*s) != primary_slot);
        let mut at = None;
        for s in &slots {
            if let Ok(t) = self.cluster.signal(self.slots[*s], NodeSignal::Kill).await {
                at.get_or_insert(t);
            }
        }
        let Some(at) = at else {
            return Ok(()); // nothing alive there; replace_dead restarts them
        };
        let name = self.hosts[host].name().to_owned();
        let fresh = SimulatedHost::start(name).await?;
        // Dropping the old host kills its init, and with it what is left in its namespace.
        drop(std::mem::replace(&mut self.hosts[host], fresh));
        for s in &slots {
            self.cluster
                .wait_exit(self.slots[*s], Duration::from_secs(10))
                .await?;
        }
        let wait = Duration::from_millis(self.rng.u64(0..=500));
        tokio::time::sleep(wait).await;
        let first = slots.first().copied();
        let pid = first.map(|s| self.slots[s]);
        for s in &slots {
            self.respawn(*s)?;
        }
        fault.detail = format!(
            "SIGKILL every process of host {} ({} nodes), the host back after {} ms",
            host + 1,
            slots.len(),
            wait.as_millis()
        );
        fault.slot = first;
        fault.pid = pid;
        fault.at = at;
        fault.primary_term = primary
            .filter(|(s, _, _)| Some(*s) == primary_slot)
            .map(|p| p.2);
        Ok(())
    }
}
