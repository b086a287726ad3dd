//! Connection admission: a global cap and a per-IP cap, shared by all cores.
//!
//! Touched twice per connection (accept, close), never per message. The per-IP table is
//! split into 64 mutex-guarded shards by address so cores rarely contend; the global
//! count is one atomic.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const IP_SHARDS: usize = 64;

/// The address a per-IP budget is charged to: an IPv4 address, or the /64 of an IPv6
/// one (what one host or subscriber usually controls: charging each of its 2^64
/// addresses separately would give it unlimited budgets). v4-mapped v6 counts as v4.
pub fn budget_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `connections_max` reached.
    Global,
    /// `connections_per_ip_max` reached for this address.
    PerIp,
}

impl Refusal {
    /// The core counter a refusal of this kind bumps.
    pub fn counter(
        self,
        stats: &crate::server::stats::CoreStats,
    ) -> &crate::server::stats::Counter {
        match self {
            Refusal::Global => &stats.connections_refused_global,
            Refusal::PerIp => &stats.connections_refused_per_ip,
        }
    }
}

pub struct ConnectionLimiter {
    connections_max: usize,
    connections_per_ip_max: usize,
    open: AtomicUsize,
    per_ip: Vec<Mutex<HashMap<IpAddr, usize>>>,
}

/// Held by a session; gives its slot back on drop.
pub struct ConnectionPermit {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    pub fn new(connections_max: usize, connections_per_ip_max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimiter {
            connections_max,
            connections_per_ip_max,
            open: AtomicUsize::new(0),
            per_ip: (0..IP_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, usize>> {
        let h = match ip {
            IpAddr::V4(v4) => u32::from(*v4) as usize,
            // The /64 prefix is what one host usually controls; spread by the low bits.
            IpAddr::V6(v6) => u128::from(*v6) as usize,
        };
        &self.per_ip[h.wrapping_mul(0x9E37_79B9) % IP_SHARDS]
    }

    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        let ip = budget_key(ip);
        // Reserve a global slot first; give it back if the per-IP check fails.
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.connections_max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Global);
        }
        let mut table = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        let count = table.entry(ip).or_insert(0);
        if *count >= self.connections_per_ip_max {
            drop(table);
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::PerIp);
        }
        *count += 1;
        Ok(ConnectionPermit {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut table = self
            .limiter
            .shard(&self.ip)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = table.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                table.remove(&self.ip);
            }
        }
        drop(table);
        self.limiter.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_global_and_per_ip_and_releases() {
        let l = ConnectionLimiter::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = l.try_admit(a).unwrap();
        let _p2 = l.try_admit(a).unwrap();
        assert_eq!(l.try_admit(a).err(), Some(Refusal::PerIp));
        let _p3 = l.try_admit(b).unwrap();
        assert_eq!(l.try_admit(b).err(), Some(Refusal::Global));
        assert_eq!(l.open(), 3);
        drop(p1);
        assert_eq!(l.open(), 2);
        let _p4 = l.try_admit(a).unwrap();
    }

    #[test]
    fn ipv6_hosts_are_charged_per_64() {
        let l = ConnectionLimiter::new(100, 2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:2:abcd::7".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _p = (l.try_admit(a).unwrap(), l.try_admit(b).unwrap());
        assert_eq!(l.try_admit(c).err(), Some(Refusal::PerIp), "same /64");
        let _q = l.try_admit(other).unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(budget_key(mapped), "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
